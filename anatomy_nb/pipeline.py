"""``anatomy-nb run CONFIG``: notebooks 01–05 headless into one run directory, resumable.

The pipeline is the notebooks themselves, executed with papermill, so what runs headless is
exactly what a user sees in Jupyter. Each notebook gets ``run_dir`` and its stage's ``config``
dict (``PipelineConfig.extract``, ``.hypothesize``, ``.plan``, ``.train``, ``.evaluate`` — the
config dataclasses, validated when the pipeline config is built). Between notebooks the runner
does two small things no notebook should: it writes the (optionally poisoned) data set, and it
builds one plan per intervention method from the audit's target concept.

Skipping and resuming: every step has a key — a content hash of the notebook file, its
parameters and the keys of every step before it — recorded in ``run_dir/pipeline.json`` when the
step finishes. A step whose key is unchanged is skipped; a step that failed (or was killed) has
no "done" record and runs again; a changed parameter changes that step's key and, through the
chain, the key of every step after it, so exactly the downstream steps re-run. Inside the
notebooks, the stages' own content-keyed artifacts (feature store, hypotheses, training runs)
are reused whenever their inputs are unchanged, so a re-run step is often quick.

The default config is the controlled-poisoning experiment (docs/explanation.md, "The
controlled-poisoning experiment"): real HH-RLHF pairs with a concept planted into a fraction of
chosen responses → the audit finds it → plans suppress it → DPO trains plain and with each
intervention → evaluation compares them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from .concepts.activity import PairFeatures, concept_activity
from .config import PipelineConfig
from .core.config_base import ConfigError, read_config_file
from .core.files import atomic_write_json, content_hash, read_json
from .data.pairs import load_pairs
from .data.plant import PLANTED_DATA, plant_all, truth_plants, write_planted
from .methods import METHODS, method_variant
from .results.hypothesize import Hypotheses
from .results.run import RunDir
from .results.train import PLAIN, ordered_name
from .stages.plan import choose_target, choose_topic, default_plan, set_choice
from .ui import notebooks
from .ui.report import report

__all__ = ["PipelineConfig", "STATE_FILE", "build_plans", "describe_target", "load_config", "run", "run_pipeline"]

STATE_FILE = "pipeline.json"


def dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lora_r": 4}`` → ``{"train": {"lora_r": 4}}`` (nested keys of the stage configs)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a mapping of config keys")
        node[leaf] = value
    return out


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """A config from a YAML or JSON file (None: the defaults), then ``overrides`` on top (dotted
    keys reach into a stage: ``{"train.learning_rate": 1e-4}``). Unknown keys are errors that name
    them and the valid ones, at any depth."""
    data = read_config_file(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    return PipelineConfig.from_dict(_deep_merge(data, dotted(overrides or {})), source)


# --- the steps between notebooks -------------------------------------------------------------


def write_data(run: RunDir, cfg: PipelineConfig) -> tuple[dict, dict]:
    """Stage 1's data: the configured source, or a poisoned copy written into the run. Returns
    (the extract config notebook 01 gets, what was written)."""
    extract = cfg.extract.to_dict()
    if not cfg.plants:
        return extract, {}
    pairs = list(load_pairs(cfg.extract.data, limit=cfg.extract.n_pairs, strict=cfg.extract.strict))
    planted, plants = plant_all(pairs, cfg.plants)
    path = write_planted(planted, plants, run.path / PLANTED_DATA).resolve()  # the notebooks run with cwd=notebooks/
    return {**extract, "data": str(path), "n_pairs": None}, {
        "planted_file": str(path),
        "n_planted": {p["kind"]: int(len(p["idx"])) for p in plants},
    }


INOCULATION_FILE = "inoculation.json"


def best_inoculation(run: RunDir, cid: int, log: Callable[[str], None] = print, rank: int = 1) -> str:
    """The best-ranked (or ``rank``-th) of the instructions written from the target's name and
    contexts (``stages.interventions.rank_inoculations``), ranked once per hypotheses and concept
    and kept in ``plan/inoculation.json``."""
    from .lm.recorded import recorded_model, recorded_sae
    from .stages.interventions import rank_inoculations
    from .stages.plan import inoculation_candidates

    path = run.path / "plan" / INOCULATION_FILE
    key = content_hash(
        "inoculation", 1, run.hypotheses.manifest.get("key"), cid, inoculation_candidates(run.hypotheses, cid)
    )
    cached = read_json(path) if path.exists() else {}
    if cached.get("key") == key:
        ranking = cached["ranking"]
    else:
        log(f"[anatomy-nb] plan: ranking inoculation instructions for concept {cid} on the base model")
        ranking = rank_inoculations(run, cid, recorded_model(run), recorded_sae(run)).to_dict(orient="records")
        atomic_write_json(path, {"key": key, "concept": cid, "ranking": ranking})
    if not 1 <= rank <= len(ranking):
        raise ValueError(f"inoculate#{rank}: only {len(ranking)} instructions were written for concept {cid}")
    return str(ranking[rank - 1]["instruction"])


def build_plans(run: RunDir, cfg: PipelineConfig, log: Callable[[str], None] = print) -> dict[str, dict]:
    """One plan per method (or method variant), each suppressing the target concept (amplifying
    it where the strength is negative: ``reward_shaping@-1``), on every prompt or on the scope
    ``target_scope`` names; written to ``run_dir/plan/``. An inoculation gets the best-ranked
    instruction written from the target's name and contexts."""
    hyp = run.hypotheses
    cid = choose_target(hyp, cfg.target)
    scope = (
        {"topic": choose_topic(hyp, cid)}
        if cfg.target_scope == "topic"
        else {"prompts": cfg.target_scope[len("prompts:") :]}
        if cfg.target_scope.startswith("prompts:")
        else {}
    )
    atomic_write_json(
        run.path / "plan" / "target.json", {**describe_target(run, hyp, cid), **({"scope": scope} if scope else {})}
    )
    plans = {}
    for name in cfg.methods:
        method, fields = method_variant(name)
        fields.update(scope)  # steer / ablate with a scope: refused by PipelineConfig
        strength = fields.pop("strength", cfg.strengths.get(name, cfg.strengths.get(method)))
        if METHODS[method].takes_rank:  # inoculate: the rank-th of the instructions written for the target
            rank = fields.pop("instruction_rank", 1)
            fields = {**fields, "instruction": best_inoculation(run, cid, log, rank)}
        action = "suppress"
        if strength is not None and strength < 0:  # λ < 0 (or α < 0): raise the concept instead
            action, strength = "amplify", -strength
        p = set_choice(default_plan(hyp), cid, action, method, strength, **fields)
        p.concepts = [c for c in p.concepts if c.action != "allow"]  # keep the files small
        plans[name] = p.to_dict()
        p.save(run.path / "plan" / f"{name}.json")
    return plans


def describe_target(run: RunDir, hyp: Hypotheses, cid: int) -> dict:
    """What the plans act on, and — for a poisoned run — whether it is the planted concept: the
    target's paired difference on planted pairs vs the rest, and the AUROC with which it picks
    out the planted pairs (ground truth from ``data/planted.planted.json``, never from the test)."""
    rows = hyp.ranked()
    # its first hypothesis (ranked() is in rank order)
    row = rows[(rows["source"] == "sae") & (rows["concept"] == cid)].iloc[0]
    out = {
        "concept": int(cid),
        "rank": int(row["rank"]),
        "view": str(row["view"]),
        "label": str(row.get("label", "")),
        "n_features": int(row["n_features"]),
        "cohens_d": float(row["cohens_d"]),
        "q": float(row["q"]),
    }
    truth = run.planted
    if truth is not None:
        store = run.store
        uc, ur = concept_activity(PairFeatures.from_store(store), hyp.feature_labels(store.d_sae))
        d = uc[:, cid] - ur[:, cid]
        ids = [p.id for p in store.pairs()]
        planted = np.isin(ids, truth["planted_ids"])
        out.update(
            planted_kind=truth["kind"],
            n_planted=int(planted.sum()),
            mean_diff_planted=float(d[planted].mean()) if planted.any() else None,
            mean_diff_other=float(d[~planted].mean()) if (~planted).any() else None,
        )
        out["auroc_planted"] = float(roc_auc_score(planted, d)) if 0 < planted.sum() < len(planted) else None
        plants = truth_plants(truth)
        if len(plants) > 1:  # which plant the target picks out: the one to suppress, not the one to keep
            D = uc - ur
            for pl in plants:
                hit = np.isin(ids, pl["planted_ids"])
                if not 0 < hit.sum() < len(hit):
                    continue
                out[f"auroc_{pl['kind']}_{pl['role']}"] = float(roc_auc_score(hit, d))
                # each plant's own concept, for reading its predicted spill-over against what moved
                aurocs = np.asarray([roc_auc_score(hit, D[:, j]) for j in range(D.shape[1])])
                out.setdefault("plant_concepts", {})[pl["kind"]] = {
                    "concept": int(aurocs.argmax()),
                    "auroc": float(aurocs.max()),
                }
    return out


# --- the runner --------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


Step = tuple[str, str, Callable[[], dict]]


def _steps(
    run: RunDir, cfg: PipelineConfig, pipeline_state: dict, inputs: dict, log: Callable[[str], None] = print
) -> list[Step]:
    """(step name, notebook, parameters) in order; parameters are computed lazily, just before
    the step, because some depend on what the previous steps wrote. ``inputs[name]`` receives what
    a step reads that its parameters do not show (the data file's content), for its key."""
    state: dict[str, Any] = {}

    def data_params() -> dict:
        extract, info = write_data(run, cfg)
        state["data"] = info
        # the poisoned file keeps its path when the plant changes: key its content, not its name
        path = Path(extract["data"])
        inputs["extract"] = _file_digest(path) if path.is_file() else None
        return {"config": extract}

    def plans() -> dict[str, dict]:
        if "plans" not in state:
            state["plans"] = build_plans(run, cfg, log) if cfg.methods else {}
        return state["plans"]

    nb = notebooks.notebook_for
    steps: list[Step] = []
    if "extract" in cfg.stages:
        steps.append(("extract", nb("extract"), data_params))
    if "hypothesize" in cfg.stages:
        steps.append(("hypothesize", nb("hypothesize"), lambda: {"config": cfg.hypothesize.to_dict()}))
    if "plan" in cfg.stages and cfg.methods:
        steps.append(("plan", nb("plan"), lambda: {"plan": plans()[cfg.methods[0]], "config": cfg.plan.to_dict()}))
    if "train" in cfg.stages:
        steps.append((f"train-{PLAIN}", nb("train"), lambda: {"plan": "plain", "config": cfg.train.to_dict()}))
        for m in cfg.methods:
            steps.append((f"train-{m}", nb("train"), lambda m=m: {"plan": plans()[m], "config": cfg.train.to_dict()}))
        for name, m, seed in training_orders(cfg):  # the same runs in other orders of the training pairs
            config = {**cfg.train.to_dict(), "order_seed": seed}
            steps.append(
                (
                    f"train-{name}",
                    nb("train"),
                    lambda m=m, c=config: {"plan": "plain" if m == PLAIN else plans()[m], "config": c},
                )
            )
    if "evaluate" in cfg.stages:
        steps.append(
            (
                "evaluate",
                nb("evaluate"),
                lambda: {"config": cfg.evaluate.to_dict(), **_trained_models(pipeline_state, cfg)},
            )
        )
    return steps


def training_orders(cfg: PipelineConfig) -> list[tuple[str, str, int]]:
    """(model name, run, order seed) of every run trained once more in another order
    (``order_seeds`` × ``order_methods``), seed by seed."""
    runs = [r for r in (PLAIN, *cfg.methods) if cfg.order_methods is None or r in cfg.order_methods]
    return [(ordered_name(r, seed), r, seed) for seed in cfg.order_seeds for r in runs]


def _trained_models(pipeline_state: dict, cfg: PipelineConfig) -> dict:
    """Evaluate exactly this config's training runs (name → key), not every run left in the
    directory by earlier configs."""
    if "train" not in cfg.stages:
        return {}
    names = [PLAIN, *cfg.methods, *(name for name, _, _ in training_orders(cfg))]
    keys = {n: pipeline_state["steps"].get(f"train-{n}", {}).get("artifact") for n in names}
    return {"models": keys} if all(keys.values()) else {}


def run_pipeline(config: PipelineConfig | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the state written to ``run_dir/pipeline.json``."""
    cfg = config or PipelineConfig()
    run = RunDir(cfg.run_dir)
    state_path = run.path / STATE_FILE
    state = read_json(state_path) if state_path.exists() else {"steps": {}}
    state["config"] = cfg.to_dict()
    prev_key = content_hash("pipeline", 2)
    t_all = time.time()
    inputs: dict[str, Any] = {}
    for name, notebook, make_params in _steps(run, cfg, state, inputs, log):
        params = make_params()
        key = content_hash(
            prev_key, notebook, _file_digest(notebooks.notebook_dir() / f"{notebook}.ipynb"), params, inputs.get(name)
        )
        done = state["steps"].get(name, {})
        out_name = f"{notebook[:3]}{name}"  # 04_train-plain, 05_evaluate: one executed copy per step
        out = run.path / "notebooks" / f"{out_name}.ipynb"
        if done.get("status") == "done" and done.get("key") == key and out.exists():
            log(f"[anatomy-nb] {name}: unchanged, skipped")
            prev_key = key
            continue
        log(f"[anatomy-nb] {name}: running {notebook}.ipynb → {out}")
        state["steps"][name] = {"key": key, "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(state_path, state)
        t0 = time.time()
        try:
            notebooks.run_notebook(notebook, run.path, params, html=cfg.html, output_name=out_name)
        except BaseException as exc:
            state["steps"][name].update(
                status="failed", error=f"{type(exc).__name__}: {str(exc)[:2000]}", seconds=round(time.time() - t0, 1)
            )
            atomic_write_json(state_path, state)
            log(f"[anatomy-nb] {name}: FAILED after {time.time() - t0:.0f} s; see {out} (re-run to resume from here)")
            raise
        state["steps"][name].update(status="done", seconds=round(time.time() - t0, 1))
        if name.startswith("train-"):  # the training run this step wrote (or reused), for evaluate
            state["steps"][name]["artifact"] = run.index()["train"]["key"]
        atomic_write_json(state_path, state)
        log(f"[anatomy-nb] {name}: done in {time.time() - t0:.0f} s")
        prev_key = key
    state["seconds_this_run"] = round(time.time() - t_all, 1)
    atomic_write_json(state_path, state)
    if cfg.report:
        index = report(run.path)
        state["report"] = str(index)
        log(f"[anatomy-nb] report: {index}")
    atomic_write_json(state_path, state)
    return state


def run(
    config: PipelineConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """The whole pipeline (notebooks 01–05 headless, then the report) from a PipelineConfig, a
    dict of its keys, or a YAML/JSON file; ``overrides`` on top (``run_dir="runs/x"``, or a
    stage's key as ``**{"train.learning_rate": 1e-4}``). Returns the pipeline state."""
    if isinstance(config, PipelineConfig):
        cfg = PipelineConfig.merged(config, dotted(overrides), "overrides")
    elif isinstance(config, Mapping):
        cfg = PipelineConfig.from_dict(_deep_merge(dict(config), dotted(overrides)), "config")
    else:
        cfg = load_config(config, overrides)
    return run_pipeline(cfg, log=log)
