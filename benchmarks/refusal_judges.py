"""Refusal judges against people: which judge can stage 5 trust, and on what?

Every judge is measured on three families of labelled completions: the XSTest v2 completions of
GPT-4 and Llama-2-70b-chat (450 each, labelled by people) and CAA's refusal A/B answers (816,
labelled by construction), each read three ways (``data.judges.READINGS``): as written, with the
stock refusal phrases removed, and removed where at least 10 words are left.

- the phrase list (``PhraseJudge``), on every completion;
- the refusal direction (``lm.refusal_direction``, ``judge: {backend: direction}``): fitted on two
  families (both readings), measured on the third, for each family held out in turn. The shipped
  setting (default layer, 32 tokens) is one cell of a grid of layers × response-token counts; the
  grid's held-out accuracies are written beside it, with a nested choice (the cell picked by
  fitting on one of the two fit families and testing on the other, never looking at the held-out
  one), which is the unbiased figure for "choose the cell, then measure";
- the LLM judge (``LLMJudge``) on ``--llm-n`` completions per family and reading (0 skips it; point
  ``--base-url``/``--model`` at an endpoint to measure yours).

Usage::

    python benchmarks/refusal_judges.py --out benchmarks/results/refusal-judges-2026-11-30.txt
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from anatomy_nb.config import ExplainConfig
from anatomy_nb.data.judges import CONSTRUCTED_FAMILIES, FAMILIES, LONG_WORDS, READINGS, PhraseJudge, agreement, agreement_scores, format_agreement, labelled_completions, make_judge

ALL = FAMILIES + CONSTRUCTED_FAMILIES
LAYER_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CUTS = (4, 8, 16, 32, 64)
SHIPPED_TOKENS = 32


def scores_row(judge: str, fam: str, reading: str, pred: np.ndarray, labels: pd.Series, **extra) -> dict:
    return {"judge": judge, "family": fam, "reading": reading, **extra, "n": len(labels), **agreement_scores(pred, labels)}


def grid_means(lm, layers: list[int], prompts, responses) -> np.ndarray:
    """(completions, layers, cuts, d_model): the mean residual over the first c response tokens at
    each layer, from one forward per completion (the model cut at the deepest layer)."""
    import torch

    from anatomy_nb.lm.chat import render_example
    from anatomy_nb.lm.ops import ResidualCapture

    out = np.zeros((len(prompts), len(layers), len(CUTS), lm.d_model), np.float32)
    with torch.no_grad(), ResidualCapture(lm, layers) as capture:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ex = render_example(lm.tokenizer, ({"role": "user", "content": p},), r)
            resp = ex.response_ids[: max(CUTS)]
            if not resp:
                continue
            capture(torch.tensor([ex.prompt_ids + resp]))
            for j, layer in enumerate(layers):
                h = capture.at[layer][0, len(ex.prompt_ids) :].float().numpy()
                for k, c in enumerate(CUTS):
                    out[i, j, k] = h[:c].mean(0)
    return out


def direction_rows(lm) -> tuple[list[dict], pd.DataFrame, dict]:
    from anatomy_nb.lm.refusal_direction import default_layer, direction_from_means, response_means

    layers = sorted({min(lm.n_layers - 1, round(f * lm.n_layers)) for f in LAYER_FRACTIONS})
    data, feats = {}, {}
    for fam in ALL:
        for reading in ("full", "stripped"):
            df = labelled_completions(fam, reading)
            data[(fam, reading)] = df
            feats[(fam, reading)] = grid_means(lm, layers, list(df["prompt"]), list(df["completion"]))
    shipped = (layers.index(default_layer(lm)), CUTS.index(SHIPPED_TOKENS))
    # the grid's shipped cell is what the shipped judge computes
    df = data[("gpt4", "full")].iloc[:5]
    np.testing.assert_allclose(feats[("gpt4", "full")][:5, shipped[0], shipped[1]], response_means(lm, default_layer(lm), list(df["prompt"]), list(df["completion"]), SHIPPED_TOKENS), rtol=1e-4, atol=1e-3)

    def measure(fit_fams, test_fam, cell) -> dict[str, dict]:
        direction, threshold = direction_from_means([(feats[(f, r)][:, cell[0], cell[1]], (data[(f, r)]["label"] != "compliance").to_numpy()) for f in fit_fams for r in ("full", "stripped")])
        out = {}
        for reading in READINGS:
            key = (test_fam, "full" if reading == "full" else "stripped")
            keep = (data[key]["completion"].str.split().str.len() >= LONG_WORDS).to_numpy() if reading == "stripped-long" else np.ones(len(data[key]), bool)
            out[reading] = agreement_scores((feats[key][:, cell[0], cell[1]] @ direction > threshold)[keep], data[key]["label"][keep])
        return out

    rows, grid, nested = [], [], {}
    cells = list(itertools.product(range(len(layers)), range(len(CUTS))))
    for held in ALL:
        fit = [f for f in ALL if f != held]
        for cell in cells:
            for reading, s in measure(fit, held, cell).items():
                grid.append({"held_out": held, "layer": layers[cell[0]], "tokens": CUTS[cell[1]], "reading": reading, "accuracy": s["accuracy"], "full_refusal_recall": s["full_refusal_recall"], "specificity": s["specificity"]})
        for reading, s in measure(fit, held, shipped).items():
            rows.append({"judge": f"refusal direction, layer {layers[shipped[0]]}, {SHIPPED_TOKENS} tokens (shipped)", "family": held, "reading": reading, "fit_on": " + ".join(fit), "n": s["n_accuracy"], **s})
        # nested: pick the cell by fitting on one fit family and testing on the other, both ways
        inner = {c: np.mean([s["accuracy"] for a, b in ((fit[0], fit[1]), (fit[1], fit[0])) for s in measure([a], b, c).values()]) for c in cells}
        best = max(inner, key=inner.get)
        nested[held] = {"layer": layers[best[0]], "tokens": CUTS[best[1]], "inner_accuracy": round(float(inner[best]), 3)}
        for reading, s in measure(fit, held, best).items():
            rows.append({"judge": f"refusal direction, nested choice (layer {layers[best[0]]}, {CUTS[best[1]]} tokens)", "family": held, "reading": reading, "fit_on": " + ".join(fit), "n": s["n_accuracy"], **s})
    return rows, pd.DataFrame(grid), nested


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-n", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the LLM judge: a local model alias, or the endpoint's model name with --base-url")
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint (…/v1); default: the local model")
    ap.add_argument("--skip-direction", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="the table; the direction grid goes beside it as <out>-grid.csv")
    args = ap.parse_args()
    t0 = time.time()
    rows = [scores_row("phrase list", f, r, PhraseJudge().judge(df["prompt"], df["completion"]), df["label"]) for f in ALL for r in READINGS for df in [labelled_completions(f, r)]]
    timing: dict = {"phrase list": round(time.time() - t0, 1)}
    grid, nested = None, None
    if not args.skip_direction:
        import torch

        from anatomy_nb.lm.models import load_model

        torch.set_num_threads(2)
        t0 = time.time()
        more, grid, nested = direction_rows(load_model())
        rows += more
        timing["refusal direction (features for the whole grid + fits)"] = round(time.time() - t0, 1)
    if args.llm_n:
        t0 = time.time()
        cfg = ExplainConfig(backend="openai" if args.base_url else "transformers", model=args.model, **({"base_url": args.base_url} if args.base_url else {}))
        judge = make_judge(cfg, Path(".cache/judge-benchmark"))
        rows += agreement(judge, args.llm_n).to_dict("records")
        timing["llm judge"] = round(time.time() - t0, 1)
        timing["llm judge unparsed answers"] = judge.unparsed
    df = pd.DataFrame(rows)
    table = format_agreement(df).assign(fit_on=df.get("fit_on", pd.Series([""] * len(df))).fillna(""))
    text = table.to_string(index=False) + "\n"
    if grid is not None:
        mean = grid.groupby(["layer", "tokens"])["accuracy"].mean().unstack().round(3)
        text += f"\nrefusal direction: held-out accuracy averaged over the 3 held-out families × 3 readings, per layer (rows) × response tokens (columns)\n{mean.to_string()}\n\nnested choice per held-out family: {json.dumps(nested)}\n"
    text += f"\nseconds: {json.dumps(timing)}\n"
    print(text)
    if args.out:
        args.out.write_text(f"# benchmarks/refusal_judges.py {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items() if k != 'out' and v not in (None, False))}\n# {time.strftime('%Y-%m-%d')}, 2 CPU cores; intervals: Wilson 95 %\n\n" + text)
        if grid is not None:
            grid.to_csv(args.out.with_name(args.out.stem + "-grid.csv"), index=False)


if __name__ == "__main__":
    main()
