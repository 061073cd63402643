"""Durable files: atomic writes and content hashes (numpy and pandas only, never torch).

An artifact lives in a folder keyed by a content hash of everything it was computed from
(``content_hash``), so a changed parameter never silently reuses a stale result and an unchanged
one is never recomputed. Writes are atomic (write to a temporary name, then ``os.replace``) so a
killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_replace_dir",
    "atomic_write_json",
    "atomic_save_npy",
    "atomic_write_parquet",
    "atomic_write_text",
    "content_hash",
    "jsonable",
    "naming_full_disk",
    "read_json",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


def jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
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
            h.update(json.dumps(jsonable(part), sort_keys=True, ensure_ascii=False).encode())
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
        with naming_full_disk(path):
            yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def naming_full_disk(path: Path) -> Iterator[None]:
    """A full disk (or quota) names the file being written and how much space is left: at 100k
    pairs a store is gigabytes, and "[Errno 28]" alone does not say where."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            exc.errno,
            f"{path}: the disk is full ({free / 2**20:.0f} MiB free in {path.parent}); nothing written before was "
            "changed — free space and run again (finished shards and stages are reused)",
        ) from exc


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_parquet(path: str | os.PathLike, df) -> None:
    """A pandas DataFrame as Parquet, without its index."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def atomic_replace_dir(write: Callable[[Path], None], dest: str | os.PathLike) -> Path:
    """Build a directory with ``write(tmp_dir)`` next to ``dest``, then swap it into place: a killed
    process leaves the old directory or the new one, never a half-written one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with naming_full_disk(dest):
            write(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
