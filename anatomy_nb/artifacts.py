"""Run directories and durable artifacts.

Every stage reads and writes named artifacts inside one run directory. An artifact lives in a
folder keyed by a content hash of everything it was computed from, so a changed parameter never
silently reuses a stale result and an unchanged one is never recomputed. Writes are atomic
(write to a temporary name, then ``os.replace``) so a killed process leaves either the old file
or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_json",
    "atomic_save_npy",
    "content_hash",
    "read_json",
    "RunDir",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def content_hash(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-able parts (dataclasses, dicts, lists, strings, numbers)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(bytes(part))
        else:
            h.update(json.dumps(_jsonable(part), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:length]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shared report must be readable like any file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


class RunDir:
    """A run directory: one folder per stage artifact, plus an index of the latest ones.

    ``index.json`` maps a stage name (``"features"``, later ``"hypotheses"``, ...) to the key of
    the artifact that stage last produced, so a later stage can find its input without knowing
    the parameters that made it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def index_path(self) -> Path:
        return self.path / "index.json"

    def index(self) -> dict[str, Any]:
        return read_json(self.index_path) if self.index_path.exists() else {}

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.path / stage / key

    def record(self, stage: str, key: str, **info: Any) -> None:
        index = self.index()
        index[stage] = {"key": key, "path": f"{stage}/{key}", **info}
        atomic_write_json(self.index_path, index)

    def latest(self, stage: str) -> Path:
        entry = self.index().get(stage)
        if entry is None:
            raise FileNotFoundError(
                f"{self.index_path}: no '{stage}' artifact recorded yet; run that stage first"
            )
        return self.path / entry["path"]
