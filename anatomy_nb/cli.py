"""``anatomy-nb``: the pipeline from a shell.

    anatomy-nb run [CONFIG.yaml] [--run-dir runs/x] [--set key=value]  # notebooks 01-05 headless, resumable, + report
    anatomy-nb extract --data hh-rlhf --n-pairs 200 --run-dir runs/x
    anatomy-nb train-sae --work-dir work/sae_recipe                # rebuild the default SAE
    anatomy-nb report runs/default                                 # standalone HTML: notebooks + summary
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["main"]

DEFAULT_RUN_DIR = "runs/default"


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import load_config, run_pipeline

    overrides = {}
    for flag, key in (("run_dir", "run_dir"), ("model", "model"), ("sae", "sae"), ("data", "data"), ("n_pairs", "n_pairs"), ("notebooks", "stages")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.no_html:
        overrides["html"] = False
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE (YAML value), got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v)
    cfg = load_config(args.config, overrides)
    state = run_pipeline(cfg, log=lambda m: print(m, flush=True))
    print(f"[anatomy-nb] finished: {cfg.run_dir} ({state.get('seconds_this_run', 0):.0f} s this run)", flush=True)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .data import load_pairs
    from .extract import ExtractConfig, extract

    pairs = load_pairs(args.data, limit=args.n_pairs, strict=args.strict)
    if pairs.report.skipped:
        print(f"[anatomy-nb] skipped {sum(pairs.report.skipped.values())} records: {dict(pairs.report.skipped)}", file=sys.stderr)
    store = extract(pairs, args.model, args.sae, args.run_dir, ExtractConfig(shard_size=args.shard_size))
    print(store)
    print(json.dumps({k: store.manifest[k] for k in ("key", "n_pairs", "d_sae", "layer")}, indent=2))
    return 0


def _cmd_train_sae(args: argparse.Namespace) -> int:
    from .sae_recipe import RecipeConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    card = run(args.work_dir, args.out, RecipeConfig(train_tokens=args.train_tokens))
    print(json.dumps(card["held_out_metrics"], indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    index = build_report(args.run_dir, args.out)
    print(f"[anatomy-nb] report: {index}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models import DEFAULT_MODEL
    from .sae import DEFAULT_SAE

    p = argparse.ArgumentParser(prog="anatomy-nb", description="Audit a preference data set at the level of SAE concepts.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
        sp.add_argument("--model", default=DEFAULT_MODEL, help="model alias, hub id or local directory")
        sp.add_argument("--sae", default=DEFAULT_SAE, help="shipped SAE name or local sae-lens directory")
        sp.add_argument("--data", default="hh-rlhf", help="vendored alias, local file or datasets name")
        sp.add_argument("--n-pairs", type=int, default=300)

    r = sub.add_parser("run", help="run the pipeline (notebooks 01-05) headless from a config; resumes and skips unchanged steps")
    r.add_argument("config", nargs="?", default=None, help="YAML/JSON pipeline config (default: the controlled-poisoning experiment, see anatomy_nb/pipeline.py)")
    r.add_argument("--run-dir", default=None)
    r.add_argument("--model", default=None)
    r.add_argument("--sae", default=None)
    r.add_argument("--data", default=None)
    r.add_argument("--n-pairs", type=int, default=None)
    r.add_argument("--notebooks", nargs="+", default=None, help="only these stages, e.g. 01_extract 02_hypothesize")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (YAML value), e.g. --set plant=null --set 'methods=[filter]'")
    r.add_argument("--no-html", action="store_true")
    r.set_defaults(func=_cmd_run)

    e = sub.add_parser("extract", help="write the feature store for a data set")
    common(e)
    e.add_argument("--shard-size", type=int, default=128)
    e.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    e.set_defaults(func=_cmd_extract)

    t = sub.add_parser("train-sae", help="re-train the default SAE (sweep, train, evaluate, card)")
    t.add_argument("--work-dir", default="work/sae_recipe")
    t.add_argument("--out", default=None)
    t.add_argument("--train-tokens", type=int, default=800_000)
    t.set_defaults(func=_cmd_train_sae)

    rp = sub.add_parser("report", help="render the executed notebooks and a summary page to standalone HTML")
    rp.add_argument("run_dir")
    rp.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    rp.set_defaults(func=_cmd_report)

    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
