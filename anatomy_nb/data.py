"""Preference data: every source normalised to one schema.

A :class:`PreferencePair` is a pair id, the prompt as chat messages, the chosen and rejected
responses, and free-form metadata. ``load_pairs`` reads HH-RLHF transcripts, TRL preference
formats (strings or message lists, explicit or implicit prompt), ShareGPT-style DPO files,
PandaLM, OASST ranked message trees, any ``datasets.load_dataset`` name, and local
JSON/JSONL/CSV/Parquet files (gzipped too). Dataset text is untrusted: bad input raises a
:class:`DataError` naming the file, record and field; ``strict=False`` skips and counts instead.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .artifacts import content_hash

__all__ = [
    "DataError",
    "LoadReport",
    "PairSet",
    "PreferencePair",
    "chat_corpus",
    "data_dir",
    "load_pairs",
]

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input, located: which file, which record, which field, and what is wrong."""

    def __init__(self, message: str, *, file: str | None = None, record: Any = None, field: str | None = None, reason: str = "invalid"):
        self.detail, self.file, self.record, self.field, self.reason = message, file, record, field, reason
        where = [str(file)] if file is not None else []
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def located(self, file: str, record: Any) -> "DataError":
        return DataError(self.detail, file=file, record=record, field=self.field, reason=self.reason)


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": [dict(m) for m in self.prompt], "chosen": self.chosen, "rejected": self.rejected, "metadata": dict(self.metadata)}

    @property
    def prompt_text(self) -> str:
        """The last user turn: a short human-readable handle on the prompt."""
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else (self.prompt[-1]["content"] if self.prompt else "")


@dataclass
class LoadReport:
    """What was read, what was kept, and what was skipped and why (lenient mode, ties)."""

    source: str
    format: str = ""
    n_records: int = 0
    n_pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(str(error))

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "n_records": self.n_records, "n_pairs": self.n_pairs, "skipped": dict(self.skipped), "examples": list(self.examples)}


@dataclass
class PairSet:
    pairs: list[PreferencePair]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def content_hash(self) -> str:
        return content_hash([p.to_dict() for p in self.pairs])

    def to_records(self) -> list[dict]:
        return [p.to_dict() for p in self.pairs]


# --- where the vendored data lives --------------------------------------------------------------

_ALIASES = {
    "hh-rlhf": ("hh_rlhf/harmless-base/test.jsonl.gz", "hh-rlhf"),
    "hh-rlhf-harmless-test": ("hh_rlhf/harmless-base/test.jsonl.gz", "hh-rlhf"),
    "pandalm": ("pandalm/testset-v1.json", "pandalm"),
    "oasst-en100": ("oasst_en100/en_100_tree.jsonl", "oasst"),
    "llamafactory-dpo-demo": ("llamafactory_demo/dpo_en_demo.json", "sharegpt"),
}
DEFAULT_SOURCE = "hh-rlhf"


def data_dir() -> Path:
    """The vendored ``data/`` folder (``$ANATOMY_NB_DATA`` overrides)."""
    env = os.environ.get("ANATOMY_NB_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


# --- reading records from files ----------------------------------------------------------------


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"not a valid gzip file ({exc})", file=str(path), reason="bad_file") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 at byte {exc.start} (line {line})", file=str(path), reason="bad_encoding") from exc


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _iter_file_records(path: Path, report: LoadReport, strict: bool) -> Iterator[tuple[Any, Any]]:
    """Yield (record locator, record dict) from a local file."""
    suffix = _base_suffix(path).lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield i, rec
        return
    text = _open_text(path)
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                err = DataError(f"broken JSON ({exc.msg} at column {exc.colno})", file=str(path), record=f"line {lineno}", reason="broken_json")
                if strict:
                    raise err from exc
                report.n_records += 1
                report.skip(err)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"broken JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", file=str(path), reason="broken_json") from exc
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError("expected a JSON list of records (or an object holding exactly one list)", file=str(path), reason="bad_file")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError("expected a JSON list of records", file=str(path), reason="bad_file")
        yield from enumerate(data)
    elif suffix == ".csv":
        for i, rec in enumerate(csv.DictReader(io.StringIO(text))):
            yield f"row {i + 2}", rec
    else:
        raise DataError(f"unsupported file type '{suffix or path.name}' (use .json, .jsonl, .csv or .parquet, optionally .gz)", file=str(path), reason="bad_file")


# --- per-format normalisers: record -> list of (prompt, chosen, rejected, metadata) --------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _need(rec: Mapping, key: str, kind: type | tuple = str) -> Any:
    if key not in rec or rec[key] is None:
        raise DataError("missing", field=key, reason="missing_field")
    value = rec[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"expected {names}, got {type(value).__name__}", field=key, reason="wrong_type")
    return value


def _parse_hh(transcript: str, field_name: str) -> list[dict]:
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise DataError("transcript must start with '\\n\\nHuman:'", field=field_name, reason="bad_transcript")
    turns = []
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError("transcript does not end with an Assistant turn", field=field_name, reason="bad_transcript")
    return turns


def _norm_hh(rec: Mapping) -> list[tuple]:
    chosen = _parse_hh(_need(rec, "chosen"), "chosen")
    rejected = _parse_hh(_need(rec, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("chosen and rejected transcripts have different prompts (shared prefix differs)", field="rejected", reason="prefix_mismatch")
    return [(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], {})]


def _messages(value: Any, field_name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", field=field_name, reason="wrong_type")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"message {j} is {type(m).__name__}, not an object", field=field_name, reason="wrong_type")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant", "prompter": "user", "bot": "assistant"}.get(role, role)
        if role not in ROLES:
            raise DataError(f"message {j} has unknown role {role!r}", field=field_name, reason="bad_role")
        if not isinstance(content, str):
            raise DataError(f"message {j} content is {type(content).__name__}, not a string", field=field_name, reason="wrong_type")
        out.append({"role": role, "content": content})
    return out


def _response(value: Any, field_name: str) -> tuple[list[dict], str]:
    """A response as TRL writes it: a string, one message, or a list ending in an assistant turn."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, Mapping):
        value = [value]
    msgs = _messages(value, field_name)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError("must end with an assistant message", field=field_name, reason="bad_role")
    return msgs[:-1], msgs[-1]["content"]


def _norm_trl(rec: Mapping) -> list[tuple]:
    if "chosen" not in rec:
        raise DataError("missing", field="chosen", reason="missing_field")
    if "rejected" not in rec:
        raise DataError("missing", field="rejected", reason="missing_field")
    pre_c, chosen = _response(rec["chosen"], "chosen")
    pre_r, rejected = _response(rec["rejected"], "rejected")
    if "prompt" in rec and rec["prompt"] is not None:
        prompt = _messages(rec["prompt"], "prompt")
        if pre_c or pre_r:  # implicit context inside the responses after an explicit prompt
            if pre_c != pre_r:
                raise DataError("chosen and rejected carry different conversation context", field="rejected", reason="prefix_mismatch")
            prompt = prompt + pre_c
    else:  # implicit prompt: the shared prefix of two message lists
        if pre_c != pre_r:
            raise DataError("chosen and rejected conversations have different prefixes", field="rejected", reason="prefix_mismatch")
        if not pre_c:
            raise DataError("missing (no explicit prompt and no shared conversation prefix)", field="prompt", reason="missing_field")
        prompt = pre_c
    return [(prompt, chosen, rejected, {})]


def _norm_sharegpt(rec: Mapping) -> list[tuple]:
    prompt = _messages(_need(rec, "conversations", list), "conversations")
    chosen = _need(rec, "chosen", (Mapping, str))
    rejected = _need(rec, "rejected", (Mapping, str))
    c = chosen if isinstance(chosen, str) else chosen.get("value", chosen.get("content"))
    r = rejected if isinstance(rejected, str) else rejected.get("value", rejected.get("content"))
    if not isinstance(c, str):
        raise DataError("has no string 'value'", field="chosen", reason="wrong_type")
    if not isinstance(r, str):
        raise DataError("has no string 'value'", field="rejected", reason="wrong_type")
    return [(prompt, c, r, {})]


def _norm_pandalm(rec: Mapping) -> list[tuple]:
    instruction = _need(rec, "instruction")
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"expected str, got {type(extra).__name__}", field="input", reason="wrong_type")
    prompt_text = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    r1, r2 = _need(rec, "response1"), _need(rec, "response2")
    votes = Counter()
    for key in ("annotator1", "annotator2", "annotator3"):
        v = rec.get(key)
        if v is None:
            continue
        try:
            votes[int(v)] += 1
        except (TypeError, ValueError) as exc:
            raise DataError(f"expected 0, 1 or 2, got {v!r}", field=key, reason="wrong_type") from exc
    if not votes:
        raise DataError("missing (no annotator votes)", field="annotator1", reason="missing_field")
    top, n = votes.most_common(1)[0]
    if top == 0 or list(votes.values()).count(n) > 1:
        raise DataError("tie: annotators prefer neither response", field="annotator1", reason="tie")
    chosen, rejected = (r1, r2) if top == 1 else (r2, r1)
    meta = {"votes": {str(k): v for k, v in votes.items()}}
    for key in ("motivation_app", "cmp_key"):
        if key in rec:
            meta[key] = rec[key]
    return [([{"role": "user", "content": prompt_text}], chosen, rejected, meta)]


def _norm_oasst(rec: Mapping) -> list[tuple]:
    """Every prompter node with >= 2 ranked assistant replies gives pairs: best vs each other."""
    root = _need(rec, "prompt", Mapping)
    out: list[tuple] = []

    def walk(node: Mapping, history: list[dict]) -> None:
        role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
        text = node.get("text")
        if role is None or not isinstance(text, str):
            return
        history = history + [{"role": role, "content": text}]
        replies = [r for r in node.get("replies") or [] if isinstance(r, Mapping)]
        if role == "user":
            ranked = sorted((r for r in replies if isinstance(r.get("rank"), int) and not r.get("deleted")), key=lambda r: r["rank"])
            if len(ranked) >= 2:
                best = ranked[0]
                for other in ranked[1:]:
                    out.append((history, best["text"], other["text"], {"chosen_rank": best["rank"], "rejected_rank": other["rank"], "message_id": node.get("message_id")}))
        for r in replies:
            walk(r, history)

    walk(root, [])
    return out


def _detect(rec: Any) -> str:
    if not isinstance(rec, Mapping):
        raise DataError(f"record is {type(rec).__name__}, not an object", reason="wrong_type")
    keys = set(rec)
    if "conversations" in keys:
        return "sharegpt"
    if {"response1", "response2"} <= keys:
        return "pandalm"
    if "message_tree_id" in keys and "prompt" in keys:
        return "oasst"
    if "chosen" in keys and isinstance(rec["chosen"], str) and rec["chosen"].startswith("\n\nHuman:") and "prompt" not in keys:
        return "hh-rlhf"
    if "chosen" in keys or "rejected" in keys:
        return "trl"
    raise DataError(f"unrecognised record with fields {sorted(keys)[:8]}; pass field_map={{'prompt': ..., 'chosen': ..., 'rejected': ...}}", reason="unknown_format")


_NORMALISERS: dict[str, Callable[[Mapping], list[tuple]]] = {
    "hh-rlhf": _norm_hh,
    "trl": _norm_trl,
    "sharegpt": _norm_sharegpt,
    "pandalm": _norm_pandalm,
    "oasst": _norm_oasst,
}
FORMATS = tuple(_NORMALISERS)


def _apply_field_map(rec: Any, field_map: Mapping[str, str]) -> Any:
    if not isinstance(rec, Mapping):
        return rec
    out = {k: v for k, v in rec.items() if k not in field_map.values()}
    for target, src in field_map.items():
        if src in rec:
            out[target] = rec[src]
    return out


def _check_text(value: str, field_name: str) -> None:
    if not value.strip():
        raise DataError("is empty", field=field_name, reason="empty_response")
    if "\x00" in value:
        raise DataError("contains a NUL character", field=field_name, reason="bad_text")


def load_pairs(
    source: str | os.PathLike | Iterable[Mapping] = DEFAULT_SOURCE,
    *,
    format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    split: str = "train",
    limit: int | None = None,
    strict: bool | None = None,
    id_field: str = "id",
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
    ``limit`` keeps the first ``limit`` valid pairs.
    """
    is_alias = isinstance(source, str) and source in _ALIASES
    if strict is None:
        strict = not is_alias
    if format is not None and format not in _NORMALISERS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    label, records = _open_source(source, split, format, load_dataset_kwargs)
    if is_alias:
        format = format or _ALIASES[source][1]
    report = LoadReport(source=label)
    stream = _records_with_report(records, report, strict)
    pairs: list[PreferencePair] = []
    seen_ids: dict[str, Any] = {}
    seen_formats: Counter = Counter()
    for locator, rec in stream:
        report.n_records += 1
        try:
            if field_map:
                rec = _apply_field_map(rec, field_map)
            fmt = format or _detect(rec)
            seen_formats[fmt] += 1
            normalised = _NORMALISERS[fmt](rec)
            base_id = rec.get(id_field) if isinstance(rec, Mapping) else None
            if base_id is not None and not isinstance(base_id, (str, int)):
                raise DataError(f"expected a string or integer id, got {type(base_id).__name__}", field=id_field, reason="wrong_type")
            for j, (prompt, chosen, rejected, meta) in enumerate(normalised):
                if not isinstance(chosen, str):
                    raise DataError(f"expected str, got {type(chosen).__name__}", field="chosen", reason="wrong_type")
                if not isinstance(rejected, str):
                    raise DataError(f"expected str, got {type(rejected).__name__}", field="rejected", reason="wrong_type")
                _check_text(chosen, "chosen")
                _check_text(rejected, "rejected")
                if chosen.strip() == rejected.strip():
                    raise DataError("chosen and rejected responses are identical", field="rejected", reason="identical_responses")
                if not prompt or not any(m["content"].strip() for m in prompt):
                    raise DataError("is empty", field="prompt", reason="empty_prompt")
                if base_id is None:
                    pid = f"{label_stem(label)}-{report.n_records - 1}" + (f"-{j}" if len(normalised) > 1 else "")
                else:
                    pid = str(base_id) + (f"-{j}" if len(normalised) > 1 else "")
                if pid in seen_ids:
                    raise DataError(f"duplicate pair id {pid!r} (first seen at record {seen_ids[pid]})", field=id_field, reason="duplicate_id")
                seen_ids[pid] = locator
                pairs.append(PreferencePair(id=pid, prompt=tuple(prompt), chosen=chosen, rejected=rejected, metadata={"format": fmt, **meta}))
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
            raise DataError("vendored data file not found (is the repository's data/ folder present?)", file=str(path), reason="not_found")
        return str(path), (lambda report, strict, p=path: _iter_file_records(p, report, strict))
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DataError("is a directory; pass a file", file=str(path), reason="bad_file")
        return str(path), (lambda report, strict, p=path: _iter_file_records(p, report, strict))
    if not isinstance(source, str) or re.search(r"\.(jsonl?|csv|parquet|txt)(\.gz)?$", str(source)):
        raise DataError("file not found", file=str(source), reason="not_found")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError("not a local file, and the 'datasets' package is missing", file=str(source), reason="not_found") from exc
    try:
        ds = datasets.load_dataset(str(source), split=split, **load_dataset_kwargs)
    except Exception as exc:
        raise DataError(f"not a local file or vendored alias, and datasets.load_dataset failed: {exc}", file=str(source), reason="not_found") from exc
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
    for rec in json.loads(_open_text(path)):
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        if rec.get("output", "").strip():
            yield [{"role": "user", "content": prompt}], rec["output"], "gpteacher-roleplay"
