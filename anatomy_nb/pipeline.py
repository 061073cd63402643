"""``anatomy-nb run CONFIG``: notebooks 01–05 headless into one run directory, resumable.

The pipeline is the notebooks themselves, executed with papermill, so what runs headless is
exactly what a user sees in Jupyter. Between notebooks the runner does two small things no
notebook should: it writes the (optionally poisoned) data set, and it builds one plan per
intervention method from the audit's target concept.

Skipping and resuming: every step has a key — a content hash of the notebook file, its
parameters and the keys of every step before it — recorded in ``run_dir/pipeline.json`` when the
step finishes. A step whose key is unchanged is skipped; a step that failed (or was killed) has
no "done" record and runs again; a changed parameter changes that step's key and, through the
chain, the key of every step after it, so exactly the downstream steps re-run. Inside the
notebooks, the stages' own content-keyed artifacts (feature store, hypotheses, training runs)
are reused whenever their inputs are unchanged, so a re-run step is often quick.

The default config is the controlled-poisoning experiment (DESIGN.md, issue 6): real HH-RLHF
pairs with a concept planted into a fraction of chosen responses → the audit finds it → plans
suppress it → DPO trains plain and with each intervention → evaluation compares them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .artifacts import RunDir, atomic_write_json, content_hash, read_json

__all__ = ["PipelineConfig", "load_config", "run_pipeline", "STATE_FILE", "choose_target", "build_plans"]

STATE_FILE = "pipeline.json"


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    model: str = "smollm2-135m-instruct"
    sae: str = "smollm2-135m-instruct-topk"
    data: str = "hh-rlhf"
    n_pairs: int | None = 300
    # controlled poisoning: {"kind": bold|opener|emoji|question|word, "fraction": 0.25, "seed": 0}; None: the data as is
    # 0.5: at 0.25 plain DPO on the CPU-sized training (64 pairs) did not learn the plant (greedy
    # generations: 3-4/16 bold vs 1/16 base); at 0.5 it did (30/30). See README "The whole pipeline".
    plant: dict | None = field(default_factory=lambda: {"kind": "bold", "fraction": 0.5, "seed": 0})
    # the concept the plans act on: "top" (the highest-ranked significant concept DPO is predicted
    # to raise) or a concept id of the hypotheses table
    target: str | int = "top"
    methods: list[str] = field(default_factory=lambda: ["reward_shaping", "filter"])  # trained besides plain DPO
    # method → strength (else intervene.DEFAULT_STRENGTH); shaping λ = 4: at λ = 1 it removed 55 % of the plant, at 4 all of it
    strengths: dict = field(default_factory=lambda: {"reward_shaping": 4.0})
    hypothesize: dict = field(default_factory=dict)  # parameters of 02_hypothesize
    # parameters of 04_train (each run); lr 1e-3: at TrainConfig's 5e-5 (and 5e-4) 64 pairs teach
    # nothing measurable; 20 % of the prompts held out (60 pairs, about half of them unpoisoned) so
    # that the on-target preference is measured on more than a handful of clean pairs
    train: dict = field(default_factory=lambda: {"learning_rate": 1e-3, "heldout_fraction": 0.2})
    # parameters of 05_evaluate; CPU-sized (EvalConfig defaults are larger)
    evaluate: dict = field(default_factory=lambda: {"n_prompts": 30, "max_new_tokens": 32, "n_ab": 8, "n_harmful": 6, "n_xstest": 6, "max_pref_pairs": 60})
    stages: list[str] = field(default_factory=lambda: ["01_extract", "02_hypothesize", "03_intervene", "04_train", "05_evaluate"])
    html: bool = True
    report: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<config>") -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**dict(data))
        if cfg.plant is not None:
            from .plant import KINDS

            if not isinstance(cfg.plant, Mapping) or cfg.plant.get("kind") not in KINDS:
                raise ValueError(f"{source}: plant.kind must be one of {sorted(KINDS)}, got {cfg.plant!r}")
        from .plan import METHODS

        bad = [m for m in cfg.methods if m not in METHODS]
        if bad:
            raise ValueError(f"{source}: methods {bad} unknown; known: {list(METHODS)}")
        return cfg


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """A config from a YAML or JSON file (None: the defaults), then ``overrides`` on top."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data.update(overrides or {})
    return PipelineConfig.from_dict(data, source)


# --- the steps between notebooks -------------------------------------------------------------


def write_data(run: RunDir, cfg: PipelineConfig) -> tuple[str, int | None, dict]:
    """The data source notebook 01 reads: the configured one, or a poisoned copy in the run."""
    if cfg.plant is None:
        return cfg.data, cfg.n_pairs, {}
    from .data import load_pairs
    from .plant import PLANTED_DATA, plant, write_planted

    pairs = list(load_pairs(cfg.data, limit=cfg.n_pairs))
    planted, idx = plant(pairs, cfg.plant["kind"], float(cfg.plant.get("fraction", 0.25)), int(cfg.plant.get("seed", 0)))
    path = write_planted(planted, idx, cfg.plant["kind"], run.path / PLANTED_DATA)
    path = path.resolve()  # the notebooks run with cwd=notebooks/
    return str(path), None, {"planted_file": str(path), "n_planted": int(len(idx))}


def choose_target(hyp, target: str | int = "top") -> int:
    """The concept the plans act on. "top": the concept of the highest-ranked significant
    hypothesis (whole response, opening or ending) whose predicted direction is up (what DPO would
    learn); an int: that concept."""
    ov = hyp.overall()
    if target != "top":
        cid = int(target)
        if cid not in set(ov["concept"].astype(int)):
            raise ValueError(f"target concept {cid} is not in the hypotheses table")
        return cid
    ranked = hyp.ranked()
    up = ranked[(ranked["significant"]) & (ranked["predicted_direction"] == "up")]
    if up.empty:
        raise ValueError("no significant concept that DPO is predicted to raise: nothing to suppress (set `target` to a concept id)")
    return int(up.sort_values("rank").iloc[0]["concept"])


def build_plans(run: RunDir, cfg: PipelineConfig) -> dict[str, dict]:
    """One plan per method, each suppressing the target concept; written to ``run_dir/plans/``."""
    from .hypothesize import Hypotheses
    from .intervene import default_plan, set_choice

    hyp = Hypotheses.from_run(run)
    cid = choose_target(hyp, cfg.target)
    atomic_write_json(run.path / "plans" / "target.json", describe_target(run, hyp, cid))
    plans = {}
    for method in cfg.methods:
        plan = set_choice(default_plan(hyp), cid, "suppress", method, cfg.strengths.get(method))
        plan.concepts = [c for c in plan.concepts if c.action != "allow"]  # keep the files small
        plans[method] = plan.to_dict()
        plan.save(run.path / "plans" / f"{method}.json")
    return plans


def describe_target(run: RunDir, hyp, cid: int) -> dict:
    """What the plans act on, and — for a poisoned run — whether it is the planted concept: the
    target's paired difference on planted pairs vs the rest, and the AUROC with which it picks
    out the planted pairs (ground truth from ``data/planted.planted.json``, never from the test)."""
    import numpy as np

    from .extract import FeatureStore
    from .hypothesize import PairFeatures, concept_activity
    from .plant import planted_truth

    rows = hyp.ranked()
    row = rows[rows["concept"] == cid].iloc[0]  # the concept's first hypothesis (ranked() is in rank order)
    out = {"concept": int(cid), "rank": int(row["rank"]), "view": str(row["view"]), "label": str(row.get("label", "")), "n_features": int(row["n_features"]), "cohens_d": float(row["cohens_d"]), "q": float(row["q"])}
    truth = planted_truth(run.path)
    if truth is not None:
        from sklearn.metrics import roc_auc_score

        store = FeatureStore.from_run(run)
        pf = PairFeatures.from_store(store)
        labels = np.full(pf.d_sae, -1)
        labels[hyp.features["feature"].to_numpy()] = hyp.features["concept"].to_numpy()
        uc, ur = concept_activity(pf, labels)
        d = uc[:, cid] - ur[:, cid]
        planted = np.isin([p["id"] for p in store.pairs()], truth["planted_ids"])
        out.update(planted_kind=truth["kind"], n_planted=int(planted.sum()), mean_diff_planted=float(d[planted].mean()) if planted.any() else None, mean_diff_other=float(d[~planted].mean()) if (~planted).any() else None)
        out["auroc_planted"] = float(roc_auc_score(planted, d)) if 0 < planted.sum() < len(planted) else None
    return out


# --- the runner --------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _steps(run: RunDir, cfg: PipelineConfig, pipeline_state: dict, inputs: dict) -> list[tuple[str, str, Callable[[], dict]]]:
    """(step name, notebook, parameters) in order; parameters are computed lazily, just before
    the step, because some depend on what the previous steps wrote. ``inputs[name]`` receives what
    a step reads that its parameters do not show (the data file's content), for its key."""
    state: dict[str, Any] = {}

    def data_params() -> dict:
        source, n_pairs, info = write_data(run, cfg)
        state["data"] = info
        # the poisoned file keeps its path when the plant changes: key its content, not its name
        path = Path(source)
        inputs["01_extract"] = _file_digest(path) if path.is_file() else None
        return {"model": cfg.model, "sae": cfg.sae, "data_source": source, "n_pairs": n_pairs}

    def plans() -> dict[str, dict]:
        if "plans" not in state:
            state["plans"] = build_plans(run, cfg) if cfg.methods else {}
        return state["plans"]

    steps: list[tuple[str, str, Callable[[], dict]]] = []
    if "01_extract" in cfg.stages:
        steps.append(("01_extract", "01_extract", data_params))
    if "02_hypothesize" in cfg.stages:
        steps.append(("02_hypothesize", "02_hypothesize", lambda: dict(cfg.hypothesize)))
    if "03_intervene" in cfg.stages and cfg.methods:
        steps.append(("03_intervene", "03_intervene", lambda: {"plan": plans()[cfg.methods[0]]}))
    if "04_train" in cfg.stages:
        steps.append(("04_train-plain", "04_train", lambda: {**cfg.train, "plan": "plain"}))
        for m in cfg.methods:
            steps.append((f"04_train-{m}", "04_train", lambda m=m: {**cfg.train, "plan": plans()[m]}))
    if "05_evaluate" in cfg.stages:
        steps.append(("05_evaluate", "05_evaluate", lambda: {**cfg.evaluate, **_trained_models(pipeline_state, cfg)}))
    return steps


def _trained_models(pipeline_state: dict, cfg: PipelineConfig) -> dict:
    """Evaluate exactly this config's training runs (name → key), not every run left in the
    directory by earlier configs."""
    if "04_train" not in cfg.stages:
        return {}
    names = ["plain", *cfg.methods]
    keys = {n: pipeline_state["steps"].get(f"04_train-{n}", {}).get("artifact") for n in names}
    return {"models": keys} if all(keys.values()) else {}


def run_pipeline(config: PipelineConfig | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the state written to ``run_dir/pipeline.json``."""
    from . import notebooks

    cfg = config or PipelineConfig()
    run = RunDir(cfg.run_dir)
    state_path = run.path / STATE_FILE
    state = read_json(state_path) if state_path.exists() else {"steps": {}}
    state["config"] = asdict(cfg)
    prev_key = content_hash("pipeline", 1)
    t_all = time.time()
    inputs: dict[str, Any] = {}
    for name, notebook, make_params in _steps(run, cfg, state, inputs):
        params = make_params()
        key = content_hash(prev_key, notebook, _file_digest(notebooks.notebook_dir() / f"{notebook}.ipynb"), params, inputs.get(name))
        done = state["steps"].get(name, {})
        out = run.path / "notebooks" / f"{name}.ipynb"
        if done.get("status") == "done" and done.get("key") == key and out.exists():
            log(f"[anatomy-nb] {name}: unchanged, skipped")
            prev_key = key
            continue
        log(f"[anatomy-nb] {name}: running {notebook}.ipynb → {out}")
        state["steps"][name] = {"key": key, "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(state_path, state)
        t0 = time.time()
        try:
            notebooks.run_notebook(notebook, run.path, params, html=cfg.html, strict_parameters=False, output_name=name)
        except BaseException as exc:
            state["steps"][name].update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:2000]}", seconds=round(time.time() - t0, 1))
            atomic_write_json(state_path, state)
            log(f"[anatomy-nb] {name}: FAILED after {time.time() - t0:.0f} s; see {out} (re-run to resume from here)")
            raise
        state["steps"][name].update(status="done", seconds=round(time.time() - t0, 1))
        if notebook == "04_train":  # the training run this step wrote (or reused), for 05
            state["steps"][name]["artifact"] = run.index()["train"]["key"]
        atomic_write_json(state_path, state)
        log(f"[anatomy-nb] {name}: done in {time.time() - t0:.0f} s")
        prev_key = key
    state["seconds_this_run"] = round(time.time() - t_all, 1)
    atomic_write_json(state_path, state)
    if cfg.report:
        from .report import build_report

        index = build_report(run.path)
        state["report"] = str(index)
        log(f"[anatomy-nb] report: {index}")
    atomic_write_json(state_path, state)
    return state
