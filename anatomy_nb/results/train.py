"""Reading stage 4's artifacts (no torch): one finished training run, and every training run of a
run directory named by what its plan did (``plain``, ``reward_shaping``, ``filter``, …).
Reloading the trained weights is ``anatomy_nb.stages.train.load_trained``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.files import read_json
from ..core.run import RunLike, RunPaths
from ..core.stage import MANIFEST, Artifact

__all__ = [
    "PLAIN",
    "TrainResult",
    "active_entries",
    "order_of",
    "ordered_name",
    "plain_reference",
    "run_name",
    "training_runs",
]

PLAIN = "plain"  # the name of the training run whose plan changes nothing (plain DPO)
ORDER = "-order"  # <run>-order<seed>: the same run trained in another order (PipelineConfig.order_seeds)


def ordered_name(run: str, seed: int) -> str:
    """The name of ``run`` trained once more with ``TrainConfig.order_seed = seed``."""
    return f"{run}{ORDER}{int(seed)}"


def order_of(name: str) -> tuple[str, int | None]:
    """(run, seed) of a model name: ``("filter", 2)`` for ``filter-order2``; the seed is None for a
    run in the configured order."""
    run, sep, seed = name.rpartition(ORDER)
    return (run, int(seed)) if sep and run and seed.isdigit() else (name, None)


def training_order(manifest: dict) -> int:
    """The seed that ordered a training run's pairs (``TrainConfig.order_seed``, else its ``seed``)."""
    cfg = manifest.get("config", {})
    return int(cfg["order_seed"] if cfg.get("order_seed") is not None else cfg.get("seed", 0))


def plain_reference(name: str) -> str:
    """The plain-DPO run a model is read against: plain DPO trained in the same order, so that what
    the order alone moves is not credited to the intervention."""
    seed = order_of(name)[1]
    return PLAIN if seed is None else ordered_name(PLAIN, seed)


#: the format this stage writes (``stages``) and the newest this reader reads
FORMAT = 1


@dataclass
class TrainResult(Artifact):
    """A finished training run: its manifest, per-step metrics, split and data report."""

    readable_formats = (1, FORMAT)

    model: Any = None  # the trained model in memory (this session only; None when read from disk)

    @property
    def name(self) -> str:
        """``plain`` for the empty plan, else the plan's active methods joined by ``+``."""
        return run_name(self.manifest)

    def active(self) -> list[dict]:
        """The plan entries this run applied (action other than allow)."""
        return active_entries(self.manifest)

    def metrics(self) -> pd.DataFrame:
        """Per-step training metrics (one row per logged step)."""
        with open(self.path / "metrics.jsonl") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        return pd.DataFrame([r for r in rows if "train_runtime" not in r])

    def data_report(self) -> dict:
        return read_json(self.path / "data_report.json")

    def split(self) -> dict:
        return read_json(self.path / "split.json")

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TrainResult({m['n_train_pairs']} training pairs, {m['steps']} steps, {m['seconds']:.0f}s, "
            f"path={str(self.path)!r})"
        )


def active_entries(manifest: dict) -> list[dict]:
    """The plan entries of a training run's manifest that changed training."""
    return [c for c in manifest.get("plan", {}).get("concepts", []) if c.get("action", "allow") != "allow"]


def run_name(manifest: dict) -> str:
    """A training run's name from its plan: ``plain`` for the empty plan, else the active methods."""
    active = active_entries(manifest)
    if not active:
        return PLAIN
    return "+".join(dict.fromkeys(c.get("method") or "?" for c in active))


def training_runs(run: RunLike) -> dict[str, Path]:
    """Every finished training run in the run directory, named by its plan (``run_name``); a
    repeated name gets the key's first 6 characters appended. Oldest first."""
    root = RunPaths.of(run).path / "train"
    found = []
    for m in sorted(root.glob(f"*/{MANIFEST}")):
        man = read_json(m)
        if man.get("complete"):
            found.append((m.stat().st_mtime, run_name(man), m.parent))
    names: dict[str, Path] = {}
    for _, name, path in sorted(found, key=lambda t: t[0]):
        names[name if name not in names else f"{name}-{path.name[:6]}"] = path
    return names
