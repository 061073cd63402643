"""Preference data: every source normalised to one schema.

A :class:`PreferencePair` is a pair id, the prompt as chat messages, the chosen and rejected
responses, and free-form metadata. ``load_pairs`` reads HH-RLHF transcripts, TRL preference
formats (strings or message lists, explicit or implicit prompt), ShareGPT-style DPO files,
PandaLM, OASST ranked message trees, any ``datasets.load_dataset`` name, and local
JSON/JSONL/CSV/Parquet files (gzipped too). Dataset text is untrusted: bad input raises a
:class:`DataError` naming the file, record and field; ``strict=False`` skips and counts instead.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.paths import data_dir
from .formats import NORMALISERS, apply_field_map, check_text, detect_format, iter_file_records, open_text
from .schema import DataError, LoadReport, PairSet, PreferencePair

__all__ = ["DataError", "LoadReport", "PairSet", "PreferencePair", "chat_corpus", "distinct_prompts", "load_pairs"]


# --- where the vendored data lives --------------------------------------------------------------

_ALIASES = {
    "hh-rlhf": ("hh_rlhf/harmless-base/test.jsonl.gz", "hh-rlhf"),
    "hh-rlhf-harmless-test": ("hh_rlhf/harmless-base/test.jsonl.gz", "hh-rlhf"),
    "pandalm": ("pandalm/testset-v1.json", "pandalm"),
    # every pair at least one annotator prefers a response of, sides as listed, each vote recorded
    "pandalm-annotators": ("pandalm/testset-v1.json", "pandalm", {"annotator": "each"}),
    "oasst-en100": ("oasst_en100/en_100_tree.jsonl", "oasst"),
    "llamafactory-dpo-demo": ("llamafactory_demo/dpo_en_demo.json", "sharegpt"),
}
DEFAULT_SOURCE = "hh-rlhf"


def load_pairs(
    source: str | os.PathLike | Iterable[Mapping] = DEFAULT_SOURCE,
    *,
    format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    split: str = "train",
    limit: int | None = None,
    strict: bool | None = None,
    id_field: str = "id",
    annotator: int | str | None = None,
    **load_dataset_kwargs: Any,
) -> PairSet:
    """Load preference pairs from any supported source into one schema.

    ``source``: a vendored alias (``"hh-rlhf"``, ``"pandalm"``, ``"oasst-en100"``,
    ``"llamafactory-dpo-demo"``), a local file, a ``datasets.load_dataset`` name, or an iterable
    of record dicts. ``format`` forces one of ``FORMATS`` (otherwise detected per record).
    ``field_map`` renames fields first, e.g. ``{"prompt": "question", "chosen": "good"}``.
    ``strict=False`` skips bad records and counts them in ``report.skipped`` instead of raising;
    the default (``None``) is strict for your own files and lenient for the vendored aliases,
    which are real data with a few known-bad records (empty responses, mismatched prompts).
    ``limit`` keeps the first ``limit`` valid pairs. ``annotator`` (data with several annotators per
    pair: PandaLM): None, the majority vote; a number, that annotator's vote; ``"each"``, the sides
    as listed with every annotator's vote kept (``metadata["annotator_votes"]``; the alias
    ``"pandalm-annotators"``).
    """
    is_alias = isinstance(source, str) and source in _ALIASES
    if strict is None:
        strict = not is_alias
    if format is not None and format not in NORMALISERS:
        raise ValueError(f"unknown format {format!r}; choose one of {tuple(NORMALISERS)}")
    label, records = _open_source(source, split, format, load_dataset_kwargs)
    if is_alias:
        format = format or _ALIASES[source][1]
        options = _ALIASES[source][2] if len(_ALIASES[source]) > 2 else {}
        annotator = options.get("annotator", annotator)
    if annotator is not None and annotator != "each" and annotator not in (1, 2, 3):
        raise ValueError(f"annotator must be None (the majority vote), 1, 2, 3 or 'each', got {annotator!r}")
    report = LoadReport(source=label)
    stream = _records_with_report(records, report, strict)
    pairs: list[PreferencePair] = []
    seen_ids: dict[str, Any] = {}
    seen_formats: Counter = Counter()
    for locator, rec in stream:
        report.n_records += 1
        try:
            if field_map:
                rec = apply_field_map(rec, field_map)
            fmt = format or detect_format(rec)
            seen_formats[fmt] += 1
            if annotator is not None and fmt != "pandalm":
                raise DataError(f"annotator={annotator!r}: the {fmt} format has no annotators", reason="unknown_format")
            normalised = NORMALISERS[fmt](rec, annotator) if fmt == "pandalm" else NORMALISERS[fmt](rec)
            base_id = rec.get(id_field) if isinstance(rec, Mapping) else None
            if base_id is not None and (isinstance(base_id, bool) or not isinstance(base_id, (str, int))):
                raise DataError(
                    f"expected a string or integer id, got {type(base_id).__name__}",
                    field=id_field,
                    reason="wrong_type",
                )
            for j, (prompt, chosen, rejected, meta) in enumerate(normalised):
                if not isinstance(chosen, str):
                    raise DataError(f"expected str, got {type(chosen).__name__}", field="chosen", reason="wrong_type")
                if not isinstance(rejected, str):
                    raise DataError(
                        f"expected str, got {type(rejected).__name__}", field="rejected", reason="wrong_type"
                    )
                check_text(chosen, "chosen")
                check_text(rejected, "rejected")
                if chosen.strip() == rejected.strip():
                    raise DataError(
                        "chosen and rejected responses are identical", field="rejected", reason="identical_responses"
                    )
                if not prompt or not any(m["content"].strip() for m in prompt):
                    raise DataError("is empty", field="prompt", reason="empty_prompt")
                if base_id is None:
                    pid = f"{label_stem(label)}-{report.n_records - 1}" + (f"-{j}" if len(normalised) > 1 else "")
                else:
                    pid = str(base_id) + (f"-{j}" if len(normalised) > 1 else "")
                if pid in seen_ids:
                    raise DataError(
                        f"duplicate pair id {pid!r} (first seen at record {seen_ids[pid]})",
                        field=id_field,
                        reason="duplicate_id",
                    )
                seen_ids[pid] = locator
                pairs.append(
                    PreferencePair(
                        id=pid, prompt=tuple(prompt), chosen=chosen, rejected=rejected, metadata={"format": fmt, **meta}
                    )
                )
        except DataError as err:
            located = err.located(label, locator)
            if err.reason == "tie":
                report.skip(located)  # ties are not errors: PandaLM marks them on purpose
                continue
            if strict:
                raise located from None
            report.skip(located)
        if limit is not None and len(pairs) >= limit:
            pairs = pairs[:limit]
            break
    if report.n_records == 0 or (not pairs and strict):
        raise DataError("no preference pairs found", file=label, reason="empty")
    report.n_pairs = len(pairs)
    report.format = ",".join(sorted(seen_formats)) if seen_formats else (format or "")
    return PairSet(pairs=pairs, report=report)


def label_stem(label: str) -> str:
    name = Path(label).name
    for suffix in (".gz", ".jsonl", ".json", ".csv", ".parquet"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "pair"


def _records_with_report(records: Iterable, report: LoadReport, strict: bool) -> Iterator[tuple[Any, Any]]:
    if callable(records):
        yield from records(report, strict)
    else:
        yield from records


def _open_source(source, split: str, format: str | None, load_dataset_kwargs: dict):
    if not isinstance(source, (str, os.PathLike)):
        return "records", list(enumerate(source))
    if isinstance(source, str) and source in _ALIASES:
        path = data_dir() / _ALIASES[source][0]
        if not path.exists():
            raise DataError(
                "vendored data file not found (is the repository's data/ folder present?)",
                file=str(path),
                reason="not_found",
            )
        return str(path), (lambda report, strict, p=path: iter_file_records(p, report, strict))
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DataError("is a directory; pass a file", file=str(path), reason="bad_file")
        return str(path), (lambda report, strict, p=path: iter_file_records(p, report, strict))
    if not isinstance(source, str) or re.search(r"\.(jsonl?|csv|parquet|txt)(\.gz)?$", str(source)):
        raise DataError("file not found", file=str(source), reason="not_found")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(
            "not a local file, and the 'datasets' package is missing", file=str(source), reason="not_found"
        ) from exc
    try:
        ds = datasets.load_dataset(str(source), split=split, **load_dataset_kwargs)
    except Exception as exc:
        raise DataError(
            f"not a local file or vendored alias, and datasets.load_dataset failed: {exc}",
            file=str(source),
            reason="not_found",
        ) from exc
    return f"{source}[{split}]", list(enumerate(ds))


# --- plain chat text for SAE training -------------------------------------------------------------


def chat_corpus(include_pairs: bool = True) -> Iterator[tuple[list[dict], str, str]]:
    """(prompt messages, response, origin) from every vendored chat corpus.

    Used to train the default SAE: both sides of the vendored preference pairs, plus the
    GPTeacher role-play instructions and the other corpora's replies.
    """
    if include_pairs:
        for alias in ("hh-rlhf", "pandalm", "oasst-en100", "llamafactory-dpo-demo"):
            for pair in load_pairs(alias):
                yield list(pair.prompt), pair.chosen, alias
                yield list(pair.prompt), pair.rejected, alias
    path = data_dir() / "gpteacher_roleplay/roleplay-simple-deduped-roleplay-dataset.json"
    for rec in json.loads(open_text(path)):
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        if rec.get("output", "").strip():
            yield [{"role": "user", "content": prompt}], rec["output"], "gpteacher-roleplay"


def distinct_prompts(pairs: Sequence[PreferencePair], n: int) -> list[tuple[str, tuple]]:
    """(pair id, prompt) of the first ``n`` distinct prompts, in order."""
    seen: dict[str, tuple] = {}
    for p in pairs:
        if p.prompt_key not in seen:
            seen[p.prompt_key] = (p.id, p.prompt)
        if len(seen) >= n:
            break
    return list(seen.values())
