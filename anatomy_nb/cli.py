"""``anatomy-nb``: the pipeline and each stage from a shell. Every flag comes from a config
dataclass (``anatomy_nb.config``): ``anatomy-nb <command> --help`` lists them with their defaults.

    anatomy-nb run [CONFIG.yaml] [--run-dir runs/x] [--train.learning-rate 1e-4] [--set plant=null]
    anatomy-nb extract --data hh-rlhf --n-pairs 200 --run-dir runs/x
    anatomy-nb hypothesize --run-dir runs/x [--fdr 0.1] [--concepts.resolution 0.1]
    anatomy-nb plan --run-dir runs/x --spec plan.json
    anatomy-nb train --run-dir runs/x [--plan runs/x] [--learning-rate 1e-3]
    anatomy-nb evaluate --run-dir runs/x [--n-prompts 60]
    anatomy-nb subspace [configs/subspace-gpu.yaml] --run-dir runs/subspace [--dim 8]   # DAS / HyperDAS on RAVEL
    anatomy-nb compare-audits runs/a runs/b --run-dir runs/a-vs-b   # two data sets by concept
    anatomy-nb compare-audits runs/pandalm-annotators              # one data set's annotators
    anatomy-nb train-sae --work-dir work/sae_recipe       # rebuild the default SAE
    anatomy-nb report runs/default                        # standalone HTML: notebooks + summary

Values are YAML (``none``, ``true``, ``[a, b]``). The stage modules are imported only by the command
that needs them, so ``anatomy-nb report`` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import (
    CompareAuditsConfig,
    EvalConfig,
    ExtractConfig,
    HypothesizeConfig,
    PipelineConfig,
    PlanConfig,
    RecipeConfig,
    SubspaceConfig,
    TrainConfig,
)
from .core.config_base import ConfigError, read_config_file, yaml_value

__all__ = ["main"]

DEFAULT_RUN_DIR = "runs/default"


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import load_config, run_pipeline

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE (YAML value), got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml_value(v)
    cfg = PipelineConfig.from_args(args, base=load_config(args.config, overrides))
    state = run_pipeline(cfg, log=lambda m: print(m, flush=True))
    print(f"[anatomy-nb] finished: {cfg.run_dir} ({state.get('seconds_this_run', 0):.0f} s this run)", flush=True)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .stages.extract import extract

    store = extract(None, None, None, args.run_dir, ExtractConfig.from_args(args))
    print(store)
    print(json.dumps({k: store.manifest[k] for k in ("key", "n_pairs", "d_sae", "layer")}, indent=2))
    return 0


def _cmd_hypothesize(args: argparse.Namespace) -> int:
    from .stages.hypothesize import hypothesize

    print(hypothesize(args.run_dir, HypothesizeConfig.from_args(args)))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .stages.plan import plan

    p = plan(args.run_dir, args.spec, PlanConfig.from_args(args))
    print(f"{len(p.active)} of {len(p.concepts)} concepts changed; written to {args.run_dir}/plan/plan.json")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .data.pairs import load_pairs
    from .stages.train import train

    pairs = load_pairs(args.pairs, limit=args.limit) if args.pairs else None
    print(train(args.run_dir, args.plan, pairs=pairs, config=TrainConfig.from_args(args), force=args.force))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .stages.evaluate import evaluate

    res = evaluate(args.run_dir, config=EvalConfig.from_args(args), force=args.force)
    print(res)
    print(res.comparison_table().to_string())
    return 0


def _cmd_subspace(args: argparse.Namespace) -> int:
    from .stages.subspace import learn_subspace

    base = SubspaceConfig.from_dict(read_config_file(args.config), args.config) if args.config else None
    res = learn_subspace(args.run_dir, SubspaceConfig.from_args(args, base=base), force=args.force)
    print(res)
    print(res.table().drop(columns=["features"]).round(3).to_string())
    return 0


def _cmd_compare_audits(args: argparse.Namespace) -> int:
    from .stages.compare_audits import compare_audits

    base = CompareAuditsConfig.from_dict(read_config_file(args.config), args.config) if args.config else None
    res = compare_audits(
        args.a, args.b, run_dir=args.run_dir, config=CompareAuditsConfig.from_args(args, base=base), force=args.force
    )
    print(res)
    for sentence in res.sentences():
        print(sentence)
    print(res.table().to_string(index=False))
    return 0


def _cmd_train_sae(args: argparse.Namespace) -> int:
    from .lm.sae_recipe import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    card = run(args.work_dir, args.out, RecipeConfig.from_args(args))
    print(json.dumps(card["held_out_metrics"], indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .ui.report import report

    print(f"[anatomy-nb] report: {report(args.run_dir, args.out)}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anatomy-nb", description="Audit a preference data set at the level of SAE concepts."
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run", help="run the pipeline (notebooks 01-05) headless from a config; resumes and skips unchanged steps"
    )
    r.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML/JSON pipeline config (default: the controlled-poisoning experiment, configs/poisoning.yaml)",
    )
    r.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key (YAML value; dotted for a stage), e.g. --set plant=null --set train.lora_r=4",
    )
    PipelineConfig.add_arguments(r)
    r.set_defaults(func=_cmd_run)

    e = sub.add_parser("extract", help="stage 1: write the feature store for a data set")
    e.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    ExtractConfig.add_arguments(e)
    e.set_defaults(func=_cmd_extract)

    h = sub.add_parser("hypothesize", help="stage 2: concepts, tests, topics, labels, baselines")
    h.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    HypothesizeConfig.add_arguments(h)
    h.set_defaults(func=_cmd_hypothesize)

    pl = sub.add_parser(
        "plan", help="stage 3: validate a plan against the hypotheses and write it to RUN_DIR/plan/plan.json"
    )
    pl.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    pl.add_argument(
        "--spec", default=None, help="plan file or JSON string (default: the run's plan, else every concept allowed)"
    )
    PlanConfig.add_arguments(pl)
    pl.set_defaults(func=_cmd_plan)

    t = sub.add_parser(
        "train",
        help=(
            "stage 4: DPO with a plan (plain DPO without one); under accelerate: accelerate launch -m "
            "anatomy_nb.cli train ..."
        ),
    )
    t.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    t.add_argument("--plan", default=None, help="plan file, run dir (its plan) or JSON string; omit for plain DPO")
    t.add_argument("--pairs", default=None, help="pairs source for load_pairs (default: the run's feature store)")
    t.add_argument("--limit", type=int, default=None, help="with --pairs: read at most this many pairs")
    t.add_argument("--force", action="store_true")
    TrainConfig.add_arguments(t)
    t.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="stage 5: base vs every training run; predicted vs actual, behaviour")
    ev.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    ev.add_argument("--force", action="store_true")
    EvalConfig.add_arguments(ev)
    ev.set_defaults(func=_cmd_evaluate)

    su = sub.add_parser(
        "subspace",
        help=(
            "concept subspaces from counterfactual pairs: DAS and HyperDAS on RAVEL beside the SAE's features "
            "(notebook 06)"
        ),
    )
    su.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML/JSON SubspaceConfig (e.g. configs/subspace-gpu.yaml); flags override it",
    )
    su.add_argument("--run-dir", default="runs/subspace")
    su.add_argument("--force", action="store_true")
    SubspaceConfig.add_arguments(su)
    su.set_defaults(func=_cmd_subspace)

    ca = sub.add_parser(
        "compare-audits",
        help="two data sets (two run directories) or one data set's annotators (one) compared by concept",
    )
    ca.add_argument("a", help="run directory with a feature store (side A, or the annotated data set)")
    ca.add_argument("b", nargs="?", default=None, help="run directory with side B's feature store (omit: annotators)")
    ca.add_argument("--run-dir", default=None, help="where the comparison is written (default: A's run directory)")
    ca.add_argument("--config", default=None, help="YAML/JSON CompareAuditsConfig; flags override it")
    ca.add_argument("--force", action="store_true")
    CompareAuditsConfig.add_arguments(ca)
    ca.set_defaults(func=_cmd_compare_audits)

    s = sub.add_parser("train-sae", help="re-train the default SAE (sweep, train, evaluate, card)")
    s.add_argument("--work-dir", default="work/sae_recipe")
    s.add_argument("--out", default=None)
    RecipeConfig.add_arguments(s)
    s.set_defaults(func=_cmd_train_sae)

    rp = sub.add_parser("report", help="render the executed notebooks and a summary page to standalone HTML")
    rp.add_argument("run_dir")
    rp.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    rp.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"anatomy-nb {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
