"""Refusal judges against people: which judge can stage 5 trust, and on what?

Measures, on the human-labelled XSTest v2 completions (GPT-4 and Llama-2, 450 each) as written
and with the stock refusal phrases removed, plus a third family (CAA's refusal A/B answers, labels
by construction, not by people):

- the phrase list (``data.judges.PhraseJudge``), on every completion;
- a judge that reads the default model's residual stream: the difference of class means of the
  response's residual (layer ``--layer``, the first 64 response tokens; pooled by their mean or by
  the mean of the 4 most refusal-like tokens), fitted on one family as written, its threshold at the
  midpoint of the fit family's class means, measured on the others;
- the LLM judge (``data.judges.LLMJudge``) with the default model as the judge, on ``--llm-n``
  completions per family and reading (``--llm-n 0`` skips it; a local 135M model on two cores
  answers ~1 question per 2 s). Point ``--base-url``/``--model`` at an endpoint to measure yours.

Prints the tables and writes them (``--out``). Usage::

    python benchmarks/refusal_judges.py --out benchmarks/results/refusal-judges-2026-11-29.txt
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from anatomy_nb.config import ExplainConfig
from anatomy_nb.data.judges import FAMILIES, PhraseJudge, agreement, agreement_scores, format_agreement, labelled_completions, make_judge, strip_stock_phrases

N_TOKENS = 64


def caa_family(reading: str) -> pd.DataFrame:
    """CAA's refusal items as completions: each question's refusing and complying answer."""
    rows = json.loads((Path(__file__).resolve().parents[1] / "data/evals/caa/refusal_generate_dataset.json").read_text())
    out = []
    for i, r in enumerate(rows):
        question, choices = r["question"].split("\n\nChoices:")
        a, b = re.search(r"\(A\)(.*?)\n\(B\)(.*)", choices, re.S).groups()
        refusing_is_a = r["answer_matching_behavior"].strip() == "(A)"
        for text, label in ((a, "full refusal" if refusing_is_a else "compliance"), (b, "compliance" if refusing_is_a else "full refusal")):
            text = text.strip()
            out.append({"id": f"caa-{i}", "prompt": question.strip(), "completion": strip_stock_phrases(text) if reading == "stripped" else text, "label": label})
    return pd.DataFrame(out)


def family(name: str, reading: str) -> pd.DataFrame:
    return caa_family(reading) if name == "caa" else labelled_completions(name, reading)


def scores_row(judge: str, fam: str, reading: str, pred: np.ndarray, labels: pd.Series) -> dict:
    return {"judge": judge, "family": fam, "reading": reading, "n": len(labels), **agreement_scores(pred, labels)}


def residual_features(lm, df: pd.DataFrame, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Per completion: the mean residual over its first 64 tokens, and the per-token residuals."""
    from anatomy_nb.lm.ops import response_residuals

    means, tokens = np.zeros((len(df), lm.d_model), np.float32), []
    items = [(({"role": "user", "content": p},), c) for p, c in zip(df["prompt"], df["completion"])]
    for i, h in enumerate(response_residuals(lm, layer, items, max_response_tokens=N_TOKENS)):
        h = h.numpy()
        means[i] = h.mean(0) if len(h) else 0.0
        tokens.append(h)
    return means, tokens


def direction_judge(lm, layer: int, fams: list[str]) -> list[dict]:
    frames = {(f, r): family(f, r) for f in fams for r in ("full", "stripped")}
    feats = {key: (df, *residual_features(lm, df, layer)) for key, df in frames.items()}
    rows = []
    for fit in ("gpt4", "llama2"):
        df, means, _ = feats[(fit, "full")]
        y = (df["label"] != "compliance").to_numpy()
        d = means[y].mean(0) - means[~y].mean(0)
        d /= np.linalg.norm(d)
        for pool in ("mean", "top4"):
            def score(m, toks):
                if pool == "mean":
                    return m @ d
                return np.array([np.sort(t @ d)[-4:].mean() if len(t) else -np.inf for t in toks])

            s = score(means, feats[(fit, "full")][2])
            threshold = (s[y].mean() + s[~y].mean()) / 2
            for (f, r), (dft, mt, tt) in feats.items():
                if f == fit:
                    continue
                rows.append(scores_row(f"residual direction, layer {layer}, {pool} (fit: {fit})", f, r, score(mt, tt) > threshold, dft["label"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--llm-n", type=int, default=25)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the LLM judge: a local model alias, or the endpoint's model name with --base-url")
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint (…/v1); default: the local model")
    ap.add_argument("--skip-direction", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    fams = list(FAMILIES) + ["caa"]
    t0 = time.time()
    rows = []
    for f in fams:
        for r in ("full", "stripped"):
            df = family(f, r)
            rows.append(scores_row("phrase list", f, r, PhraseJudge().judge(df["prompt"], df["completion"]), df["label"]))
    timing = {"phrase list": round(time.time() - t0, 1)}
    if not args.skip_direction:
        import torch

        from anatomy_nb.lm.models import load_model

        torch.set_num_threads(2)
        t0 = time.time()
        rows += direction_judge(load_model(), args.layer, fams)
        timing["residual direction"] = round(time.time() - t0, 1)
    if args.llm_n:
        t0 = time.time()
        cfg = ExplainConfig(backend="openai" if args.base_url else "transformers", model=args.model, **({"base_url": args.base_url} if args.base_url else {}))
        judge = make_judge(cfg, Path(".cache/judge-benchmark"))
        rows += agreement(judge, args.llm_n).to_dict("records")
        timing["llm judge"] = round(time.time() - t0, 1)
        timing["llm judge unparsed answers"] = judge.unparsed
    table = format_agreement(pd.DataFrame(rows))
    text = table.to_string(index=False) + f"\n\nseconds: {json.dumps(timing)}\n"
    print(text)
    if args.out:
        args.out.write_text(f"# benchmarks/refusal_judges.py {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items() if k != 'out' and v not in (None, False))}\n# {time.strftime('%Y-%m-%d')}, 2 CPU cores; intervals: Wilson 95 %\n\n" + text)


if __name__ == "__main__":
    main()
