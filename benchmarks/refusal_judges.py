"""Refusal judges against people: which judge can stage 5 trust, and on what?

Every judge is measured on three families of labelled completions: the XSTest v2 completions of
GPT-4 and Llama-2-70b-chat (450 each, labelled by people) and CAA's refusal A/B answers (816,
labelled by construction), each read three ways (``data.judges.READINGS``): as written, with the
stock refusal phrases removed, and removed where at least 10 words are left.

- the phrase list (``PhraseJudge``), on every completion, and a control that reads no meaning (does
  the text start mid-sentence?), which would score high if the stripping gave refusals away;
- the refusal direction (``lm.refusal_direction``, ``judge: {backend: direction}``): fitted on two
  families (both readings), measured on the third, for each family held out in turn. The shipped
  setting (a probe, default layer and tokens and C) is one cell of a grid of fits (class-mean
  difference; probes of three strengths) × layers × response-token counts; the grid's held-out
  accuracies are written beside it, with a nested choice (the cell picked by fitting on one of the
  two fit families and testing on the other, never looking at the held-out one), which is the
  unbiased figure for "choose the cell, then measure". On the XSTest families it also reports the
  accuracy on the prompts where the two families disagree, where a judge that leaned on the prompt
  rather than the response would be wrong for one of them;
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

from anatomy_nb.config import ExplainConfig, JudgeConfig
from anatomy_nb.data.judges import (
    CONSTRUCTED_FAMILIES,
    FAMILIES,
    LONG_WORDS,
    READINGS,
    PhraseJudge,
    agreement,
    agreement_scores,
    format_agreement,
    labelled_completions,
    make_judge,
)

ALL = FAMILIES + CONSTRUCTED_FAMILIES
LAYER_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CUTS = (4, 8, 16, 32, 64)
PROBE_CS = (1e-4, 1e-3, 1e-2)


def scores_row(judge: str, fam: str, reading: str, pred: np.ndarray, labels: pd.Series, **extra) -> dict:
    return {
        "judge": judge,
        "family": fam,
        "reading": reading,
        **extra,
        "n": len(labels),
        **agreement_scores(pred, labels),
    }


def grid_means(lm, layers: list[int], prompts, responses, cuts: tuple[int, ...] = CUTS) -> np.ndarray:
    """(completions, layers, cuts, d_model): the mean residual over the first c response tokens at
    each layer, from one forward per completion (the model cut at the deepest layer)."""
    import torch

    from anatomy_nb.data.chat import render_example
    from anatomy_nb.lm.ops import ResidualCapture

    out = np.zeros((len(prompts), len(layers), len(cuts), lm.d_model), np.float32)
    with torch.no_grad(), ResidualCapture(lm, layers) as capture:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ex = render_example(lm.tokenizer, ({"role": "user", "content": p},), r)
            resp = ex.response_ids[: max(cuts)]
            if not resp:
                continue
            capture(torch.tensor([ex.prompt_ids + resp]))
            for j, layer in enumerate(layers):
                h = capture.at[layer][0, len(ex.prompt_ids) :].float().numpy()
                for k, c in enumerate(cuts):
                    out[i, j, k] = h[:c].mean(0)
    return out


def disagreeing_prompts() -> set[str]:
    """The XSTest prompts whose two human-labelled families disagree (one refuses, one complies):
    there, a judge that read only the prompt would be wrong on one family (``response_reliance``)."""
    g, ll = labelled_completions("gpt4"), labelled_completions("llama2")
    assert (g["prompt"].to_numpy() == ll["prompt"].to_numpy()).all(), (
        "the two XSTest families no longer share their prompt order"
    )
    return set(g["prompt"][(g["label"] != "compliance").to_numpy() != (ll["label"] != "compliance").to_numpy()])


def direction_rows(lm, cuts: tuple[int, ...] = CUTS) -> tuple[list[dict], pd.DataFrame, dict]:
    from anatomy_nb.lm.refusal_direction import (
        DEFAULT_C,
        DEFAULT_TOKENS,
        default_layer,
        direction_from_means,
        probe_from_means,
        response_means,
    )

    layers = sorted({min(lm.n_layers - 1, round(f * lm.n_layers)) for f in LAYER_FRACTIONS})
    data, feats = {}, {}
    for fam in ALL:
        for reading in ("full", "stripped"):
            df = labelled_completions(fam, reading)
            data[(fam, reading)] = df
            feats[(fam, reading)] = grid_means(lm, layers, list(df["prompt"]), list(df["completion"]), cuts)
    shipped = (layers.index(default_layer(lm)), cuts.index(DEFAULT_TOKENS), ("probe", DEFAULT_C))
    # the grid's shipped cell is what the shipped judge computes
    df = data[("gpt4", "full")].iloc[:5]
    np.testing.assert_allclose(
        feats[("gpt4", "full")][:5, shipped[0], shipped[1]],
        response_means(lm, default_layer(lm), list(df["prompt"]), list(df["completion"]), DEFAULT_TOKENS),
        rtol=1e-4,
        atol=1e-3,
    )
    disagree = disagreeing_prompts()

    def measure(fit_fams, test_fam, cell) -> dict[str, dict]:
        groups = [
            (feats[(f, r)][:, cell[0], cell[1]], (data[(f, r)]["label"] != "compliance").to_numpy())
            for f in fit_fams
            for r in ("full", "stripped")
        ]
        direction, threshold = (
            probe_from_means(groups, cell[2][1]) if cell[2][0] == "probe" else direction_from_means(groups)
        )
        out = {}
        for reading in READINGS:
            key = (test_fam, "full" if reading == "full" else "stripped")
            keep = (
                (data[key]["completion"].str.split().str.len() >= LONG_WORDS).to_numpy()
                if reading == "stripped-long"
                else np.ones(len(data[key]), bool)
            )
            pred = feats[key][:, cell[0], cell[1]] @ direction > threshold
            out[reading] = agreement_scores(pred[keep], data[key]["label"][keep])
            if test_fam in FAMILIES and reading != "stripped-long":  # the same prompts, the other family's verdict
                there = data[key]["prompt"].isin(disagree).to_numpy()
                out[reading]["response_reliance"] = agreement_scores(pred[there], data[key]["label"][there])["accuracy"]
        return out

    def name(cell) -> str:
        fit = f"probe C={cell[2][1]:g}" if cell[2][0] == "probe" else "class-mean difference"
        return f"{fit}, layer {layers[cell[0]]}, {cuts[cell[1]]} tokens"

    rows, grid, nested = [], [], {}
    fits = [("mean-difference", None)] + [("probe", c) for c in PROBE_CS]
    cells = list(itertools.product(range(len(layers)), range(len(cuts)), fits))
    for held in ALL:
        fit = [f for f in ALL if f != held]
        for cell in cells:
            for reading, s in measure(fit, held, cell).items():
                grid.append(
                    {
                        "held_out": held,
                        "method": cell[2][0],
                        "c": cell[2][1],
                        "layer": layers[cell[0]],
                        "tokens": cuts[cell[1]],
                        "reading": reading,
                        "accuracy": s["accuracy"],
                        "full_refusal_recall": s["full_refusal_recall"],
                        "specificity": s["specificity"],
                    }
                )
        # nested: pick the cell by fitting on one fit family and testing on the other, both ways
        inner = {
            c: np.mean(
                [s["accuracy"] for a, b in ((fit[0], fit[1]), (fit[1], fit[0])) for s in measure([a], b, c).values()]
            )
            for c in cells
        }
        best = max(inner, key=inner.get)
        nested[held] = {"cell": name(best), "inner_accuracy": round(float(inner[best]), 3)}
        for label, cell in (
            (f"refusal direction, {name(shipped)} (shipped)", shipped),
            (f"refusal direction, nested choice ({name(best)})", best),
        ):
            for reading, s in measure(fit, held, cell).items():
                rows.append(
                    {
                        "judge": label,
                        "family": held,
                        "reading": reading,
                        "fit_on": " + ".join(fit),
                        "n": s["n_accuracy"],
                        **s,
                    }
                )
    return rows, pd.DataFrame(grid), nested


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-n", type=int, default=0)
    ap.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the LLM judge: a local model alias, or the endpoint's model name with --base-url",
    )
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint (…/v1); default: the local model")
    ap.add_argument("--skip-direction", action="store_true")
    ap.add_argument(
        "--tokens",
        default=",".join(map(str, CUTS)),
        help="comma-separated response-token windows of the direction grid (must include the shipped one)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="the direction grid on a tiny random model: checks the script in a minute, measures nothing",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="the table; the direction grid goes beside it as <out>-grid.csv"
    )
    args = ap.parse_args()
    cuts = tuple(int(t) for t in args.tokens.split(","))
    if JudgeConfig.n_tokens not in cuts:  # the grid must hold the shipped cell; checked before minutes of features
        ap.error(f"--tokens must include the shipped {JudgeConfig.n_tokens}")
    t0 = time.time()
    rows, controls = [], []
    for f in ALL:
        for r in READINGS:
            df = labelled_completions(f, r)
            rows.append(
                scores_row("phrase list", f, r, PhraseJudge().judge(df["prompt"], df["completion"]), df["label"])
            )
            # a control that reads no meaning: does the text start mid-sentence (lower case or
            # punctuation)? High in a stripped reading, the stripping would give refusals away.
            controls.append(
                scores_row(
                    "control: starts mid-sentence",
                    f,
                    r,
                    df["completion"].str.match(r"\s*[a-z,.;:!?)\-]").to_numpy(),
                    df["label"],
                )
            )
    rows += controls
    timing: dict = {"phrase list": round(time.time() - t0, 1)}
    grid, nested = None, None
    if not args.skip_direction:
        import torch

        from anatomy_nb.lm.models import load_model, tiny_llama

        torch.set_num_threads(2)
        t0 = time.time()
        more, grid, nested = direction_rows(tiny_llama() if args.dry_run else load_model(), cuts)
        rows += more
        timing["refusal direction (features for the whole grid + fits)"] = round(time.time() - t0, 1)
    if args.llm_n:
        t0 = time.time()
        cfg = ExplainConfig(
            backend="openai" if args.base_url else "transformers",
            model=args.model,
            **({"base_url": args.base_url} if args.base_url else {}),
        )
        judge = make_judge(cfg, Path(".cache/judge-benchmark"))
        rows += agreement(judge, args.llm_n).to_dict("records")
        timing["llm judge"] = round(time.time() - t0, 1)
        timing["llm judge unparsed answers"] = judge.unparsed
    df = pd.DataFrame(rows)
    table = format_agreement(df).assign(fit_on=df.get("fit_on", pd.Series([""] * len(df))).fillna(""))
    if "response_reliance" in df:
        table["accuracy where the families disagree"] = df["response_reliance"].map(
            lambda v: f"{v:.2f}" if np.isfinite(v) else ""
        )
    text = table.to_string(index=False) + "\n"
    if grid is not None:
        mean = grid.fillna({"c": 0}).groupby(["method", "c", "layer", "tokens"])["accuracy"].mean().unstack().round(3)
        text += (
            "\nrefusal direction: held-out accuracy averaged over the 3 held-out families × 3 readings, per fit × "
            f"layer (rows) × response tokens (columns; c 0: no C)\n{mean.to_string()}\n\nnested choice per held-out "
            f"family: {json.dumps(nested)}\n"
        )
    text += f"\nseconds: {json.dumps(timing)}\n"
    print(text)
    if args.out:
        args.out.write_text(
            "# benchmarks/refusal_judges.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v not in (None, False)
            )
            + "\n# "
            f"{time.strftime('%Y-%m-%d')}, 2 CPU cores; intervals: Wilson 95 %\n\n" + text
        )
        if grid is not None:
            grid.to_csv(args.out.with_name(args.out.stem + "-grid.csv"), index=False)


if __name__ == "__main__":
    main()
