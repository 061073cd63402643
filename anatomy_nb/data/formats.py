"""Reading records from files and normalising each supported format to (prompt, chosen, rejected,
metadata) tuples. Every problem raises a :class:`DataError` naming the field (``load_pairs`` adds
the file and the record)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import ROLES, DataError, LoadReport

__all__ = ["FORMATS", "NORMALISERS", "apply_field_map", "check_text", "detect_format", "iter_file_records", "open_text"]


def open_text(path: Path) -> str:
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
        raise DataError(
            f"not valid UTF-8 at byte {exc.start} (line {line})", file=str(path), reason="bad_encoding"
        ) from exc


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def iter_file_records(path: Path, report: LoadReport, strict: bool) -> Iterator[tuple[Any, Any]]:
    """Yield (record locator, record dict) from a local file."""
    suffix = _base_suffix(path).lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:  # ArrowInvalid for a corrupt file, OSError for an unreadable one
            raise DataError(
                f"not a readable Parquet file ({type(exc).__name__}: {exc})", file=str(path), reason="bad_file"
            ) from exc
        for i, rec in enumerate(table.to_pylist()):
            yield i, rec
        return
    text = open_text(path)
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                err = DataError(
                    f"broken JSON ({exc.msg} at column {exc.colno})",
                    file=str(path),
                    record=f"line {lineno}",
                    reason="broken_json",
                )
                if strict:
                    raise err from exc
                report.n_records += 1
                report.skip(err)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"broken JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                file=str(path),
                reason="broken_json",
            ) from exc
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(
                    "expected a JSON list of records (or an object holding exactly one list)",
                    file=str(path),
                    reason="bad_file",
                )
            data = lists[0]
        if not isinstance(data, list):
            raise DataError("expected a JSON list of records", file=str(path), reason="bad_file")
        yield from enumerate(data)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for rec in reader:
            where = f"row {reader.line_num}"
            extra, short = rec.pop(None, None), [k for k, v in rec.items() if v is None]
            if extra is not None or short:
                problem = (
                    f"{len(extra)} more field(s) than the header"
                    if extra is not None
                    else f"fewer fields than the header (no {', '.join(map(repr, short))})"
                )
                err = DataError(
                    f"has {problem}; a comma inside a value needs quotes",
                    file=str(path),
                    record=where,
                    reason="bad_row",
                )
                if strict:
                    raise err
                report.n_records += 1
                report.skip(err)
                continue
            yield where, rec
    else:
        raise DataError(
            f"unsupported file type '{suffix or path.name}' (use .json, .jsonl, .csv or .parquet, optionally .gz)",
            file=str(path),
            reason="bad_file",
        )


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
        raise DataError(
            "chosen and rejected transcripts have different prompts (shared prefix differs)",
            field="rejected",
            reason="prefix_mismatch",
        )
    return [(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], {})]


def _messages(value: Any, field_name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(
            f"expected a string or a list of messages, got {type(value).__name__}",
            field=field_name,
            reason="wrong_type",
        )
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
            raise DataError(
                f"message {j} content is {type(content).__name__}, not a string", field=field_name, reason="wrong_type"
            )
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
                raise DataError(
                    "chosen and rejected carry different conversation context",
                    field="rejected",
                    reason="prefix_mismatch",
                )
            prompt = prompt + pre_c
    else:  # implicit prompt: the shared prefix of two message lists
        if pre_c != pre_r:
            raise DataError(
                "chosen and rejected conversations have different prefixes", field="rejected", reason="prefix_mismatch"
            )
        if not pre_c:
            raise DataError(
                "missing (no explicit prompt and no shared conversation prefix)", field="prompt", reason="missing_field"
            )
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


ANNOTATORS = ("annotator1", "annotator2", "annotator3")  # PandaLM's human votes: 0 tie, 1 or 2 the better response


def _norm_pandalm(rec: Mapping, annotator: int | str | None = None) -> list[tuple]:
    """One PandaLM record. ``annotator``: None takes the majority vote (ties skipped); 1, 2 or 3
    takes that annotator's vote (its ties skipped); "each" keeps the responses in the order listed
    (response 1 as "chosen") whenever any annotator prefers one. Every pair records each
    annotator's vote relative to its own sides in ``metadata["annotator_votes"]`` (+1: prefers
    "chosen", −1: prefers "rejected", 0: tie), so one extraction serves every annotator."""
    instruction = _need(rec, "instruction")
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"expected str, got {type(extra).__name__}", field="input", reason="wrong_type")
    prompt_text = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    r1, r2 = _need(rec, "response1"), _need(rec, "response2")
    raw: dict[str, int] = {}
    for key in ANNOTATORS:
        v = rec.get(key)
        if v is None:
            continue
        try:
            raw[key] = int(v)
        except (TypeError, ValueError) as exc:
            raise DataError(f"expected 0, 1 or 2, got {v!r}", field=key, reason="wrong_type") from exc
        if raw[key] not in (0, 1, 2):
            raise DataError(f"expected 0, 1 or 2, got {v!r}", field=key, reason="wrong_type")
    if not raw:
        raise DataError("missing (no annotator votes)", field="annotator1", reason="missing_field")
    votes = Counter(raw.values())
    if annotator is None:
        top, n = votes.most_common(1)[0]
        if top == 0 or list(votes.values()).count(n) > 1:
            raise DataError("tie: annotators prefer neither response", field="annotator1", reason="tie")
    elif annotator == "each":
        if not any(raw.values()):
            raise DataError("tie: no annotator prefers a response", field="annotator1", reason="tie")
        top = 1
    else:
        key = f"annotator{annotator}"
        if key not in raw:
            raise DataError("missing (this annotator did not vote)", field=key, reason="missing_field")
        if raw[key] == 0:
            raise DataError("tie: this annotator prefers neither response", field=key, reason="tie")
        top = raw[key]
    chosen, rejected = (r1, r2) if top == 1 else (r2, r1)
    side = {0: 0, top: 1, 3 - top: -1}
    meta = {"votes": {str(k): v for k, v in votes.items()}, "annotator_votes": {k: side[v] for k, v in raw.items()}}
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
            ranked = sorted(
                (r for r in replies if isinstance(r.get("rank"), int) and not r.get("deleted")), key=lambda r: r["rank"]
            )
            if len(ranked) >= 2:
                best = ranked[0]
                for other in ranked[1:]:
                    out.append(
                        (
                            history,
                            best["text"],
                            other["text"],
                            {
                                "chosen_rank": best["rank"],
                                "rejected_rank": other["rank"],
                                "message_id": node.get("message_id"),
                            },
                        )
                    )
        for r in replies:
            walk(r, history)

    walk(root, [])
    return out


def detect_format(rec: Any) -> str:
    if not isinstance(rec, Mapping):
        raise DataError(f"record is {type(rec).__name__}, not an object", reason="wrong_type")
    keys = set(rec)
    if "conversations" in keys:
        return "sharegpt"
    if {"response1", "response2"} <= keys:
        return "pandalm"
    if "message_tree_id" in keys and "prompt" in keys:
        return "oasst"
    if (
        "chosen" in keys
        and isinstance(rec["chosen"], str)
        and rec["chosen"].startswith("\n\nHuman:")
        and "prompt" not in keys
    ):
        return "hh-rlhf"
    if "chosen" in keys or "rejected" in keys:
        return "trl"
    raise DataError(
        f"unrecognised record with fields {sorted(keys)[:8]}; pass field_map={{'prompt': ..., 'chosen': ..., "
        "'rejected': ...}}",
        reason="unknown_format",
    )


NORMALISERS: dict[str, Callable[[Mapping], list[tuple]]] = {
    "hh-rlhf": _norm_hh,
    "trl": _norm_trl,
    "sharegpt": _norm_sharegpt,
    "pandalm": _norm_pandalm,
    "oasst": _norm_oasst,
}
FORMATS = tuple(NORMALISERS)


def apply_field_map(rec: Any, field_map: Mapping[str, str]) -> Any:
    if not isinstance(rec, Mapping):
        return rec
    out = {k: v for k, v in rec.items() if k not in field_map.values()}
    for target, src in field_map.items():
        if src in rec:
            out[target] = rec[src]
    return out


def check_text(value: str, field_name: str) -> None:
    if not value.strip():
        raise DataError("is empty", field=field_name, reason="empty_response")
    if "\x00" in value:
        raise DataError("contains a NUL character", field=field_name, reason="bad_text")
