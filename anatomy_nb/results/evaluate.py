"""Reading stage 5's artifact (no torch): the evaluation tables, the generations, and the wide
comparison table (a row per metric, a column per model)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.run import RunLike, RunPaths
from ..core.stage import Artifact
from ..core.stats import LEAVE_OUT
from ..data.judges import format_agreement
from .train import PLAIN, order_of, plain_reference

__all__ = [
    "BASE",
    "CEILING",
    "NO_SIGNAL",
    "PREDICTOR_COLUMNS",
    "PREDICTOR_NAMES",
    "TABLES",
    "EvalResult",
    "no_signal_rows",
]

#: the row of the predictor table that is a ceiling, not a rival (``stages.baselines``)
CEILING = "ceiling"
#: what each row of the predictor table is, for people
PREDICTOR_NAMES = {
    "audit": "the audit (chosen − rejected concept activity)",
    "audit_length_controlled": "the audit at equal lengths",
    "length": "length alone",
    "text_stats": "text statistics",
    "linear": "linear classifier on SAE features",
    CEILING: "ceiling: split-half reliability",
}
PREDICTOR_COLUMNS = [
    "model",
    "predictor",
    "n_concepts",
    "r2",
    "ci_low",
    "ci_high",
    "spearman",
    "sign_agreement",
    *(f"r2_without_top{k}" for k in LEAVE_OUT),
    "delta_r2",
    "delta_ci_low",
    "delta_ci_high",
    "reliability_predicted",
    "reliability_measured",
]

NO_SIGNAL = "no signal at this scale"


def no_signal_rows(comparison: pd.DataFrame) -> pd.Series:
    """Per comparison row, True where its metric carries no information at this scale: a rate
    (Wilson interval) at which the base model and every trained model sit at the same floor (0)
    or ceiling (1), their intervals overlapping the base's — e.g. refusal 0 for every model of a
    135M run. Such a row says nothing about the training; printing its zeros as a result would."""
    out = pd.Series(False, index=comparison.index)
    for _, g in comparison.groupby(["group", "metric"], sort=False):
        v = g["value"].to_numpy(dtype=float)
        if len(g) < 2 or not (g["interval"] == "wilson").all() or not np.isfinite(v).all():
            continue
        base = g[g["model"] == BASE]
        if base.empty:
            continue
        lo, hi = float(base["ci_low"].iloc[0]), float(base["ci_high"].iloc[0])
        at_bound = bool((v == 0).all() or (v == 1).all())
        overlap = bool(((g["ci_low"] <= hi) & (g["ci_high"] >= lo)).all())
        out[g.index] = at_bound and overlap
    return out


BASE = "base"  # the untrained model's name in every table

TABLES = (
    "predictors",
    "predictions",
    "predicted_vs_actual",
    "r2",
    "plan_vs_actual",
    "plan_r2",
    "offtarget",
    "preference",
    "targets",
    "poisoning",
    "comparison",
    "judges",
)


def _cell(row, digits: int, value: str = "r2", low: str = "ci_low", high: str = "ci_high") -> str:
    """ "value [low, high]" of one table row (empty where the value is undefined)."""
    v = float(row.get(value, np.nan))
    if not np.isfinite(v):
        return ""
    lo, hi = float(row.get(low, np.nan)), float(row.get(high, np.nan))
    return f"{v:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


#: the format this stage writes (``stages``) and the newest this reader reads
FORMAT = 3  # 3: predictors / predictions tables, Spearman and leave-top-k-out R² in r2


@dataclass
class EvalResult(Artifact):
    """A finished evaluation."""

    readable_formats = (1, FORMAT)

    @classmethod
    def from_run(cls, run: RunLike) -> EvalResult:
        """The run's latest evaluation (as the other readers' ``from_run``)."""
        return cls(RunPaths.of(run).latest("evaluate"))

    @property
    def models(self) -> list[str]:
        """Model names in table order: base first, then plain DPO, then the interventions."""
        return list(self.manifest.get("model_order") or self.manifest["models"])  # JSON objects are written key-sorted

    def table(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise KeyError(f"no table {name!r}; tables: {TABLES}")
        return pd.read_parquet(self.path / f"{name}.parquet")

    def predicted_vs_actual(self) -> pd.DataFrame:
        return self.table("predicted_vs_actual")

    def r2(self) -> pd.DataFrame:
        return self.table("r2")

    def plan_vs_actual(self) -> pd.DataFrame | None:
        """Per intervention × concept: the shift its plan predicted relative to plain DPO (stage 3,
        spill-over included) and the shift measured; None for evaluations written before it existed."""
        return self.table("plan_vs_actual") if (self.path / "plan_vs_actual.parquet").exists() else None

    def plan_r2(self) -> pd.DataFrame | None:
        """R² and sign agreement of ``plan_vs_actual`` per model, over the significant concepts and
        over the non-targeted ones (``concepts == "spill-over"``)."""
        return self.table("plan_r2") if (self.path / "plan_r2.parquet").exists() else None

    def predictors(self) -> pd.DataFrame | None:
        """The audit against simpler predictors (``stages.baselines``): per trained model a row per
        predictor — R² with its interval, Spearman, sign agreement, R² without the top 1 / 3 / 10
        concepts, ΔR² (audit − predictor) with its paired-bootstrap interval — then the split-half
        ceiling; None for evaluations written before it existed."""
        return self.table("predictors") if (self.path / "predictors.parquet").exists() else None

    def predictions(self) -> pd.DataFrame | None:
        """Per concept of the fit, every predictor's value (the audit's, length's, …)."""
        return self.table("predictions") if (self.path / "predictions.parquet").exists() else None

    def prediction_report(self, digits: int = 2) -> pd.DataFrame:
        """The predicted-vs-actual fit as people read it, a row per model and view: R² [interval],
        Spearman, sign agreement and R² without the top 1 / 3 / 10 concepts by |predicted|."""
        df = self.r2()
        out = pd.DataFrame({"model": df["model"], "view": df["view"], "concepts": df["n_concepts"]})
        out["R²"] = [_cell(r, digits) for _, r in df.iterrows()]
        for col, name in (
            ("spearman", "Spearman"),
            ("sign_agreement", "sign agreement"),
            *((f"r2_without_top{k}", f"R² without top {k}") for k in LEAVE_OUT),
        ):
            out[name] = [
                f"{v:.{digits}f}" if np.isfinite(v) else ""
                for v in df.get(col, pd.Series(np.nan, index=df.index)).astype(float)
            ]
        return out

    def predictor_table(self, model: str | None = None, digits: int = 2) -> pd.DataFrame | None:
        """``predictors()`` of one model (plain DPO by default) as people read it."""
        df = self.predictors()
        if df is None or df.empty:
            return None
        model = model or (PLAIN if (df["model"] == PLAIN).any() else str(df["model"].iloc[0]))
        df = df[df["model"] == model]
        out = pd.DataFrame(
            {"predictor": [PREDICTOR_NAMES.get(p, p) for p in df["predictor"]], "concepts": df["n_concepts"].to_numpy()}
        )
        out["R²"] = [_cell(r, digits) for _, r in df.iterrows()]
        out["ΔR² (audit − it)"] = [
            _cell(r, digits, "delta_r2", "delta_ci_low", "delta_ci_high") for _, r in df.iterrows()
        ]
        for col, name in (
            ("spearman", "Spearman"),
            ("sign_agreement", "sign agreement"),
            *((f"r2_without_top{k}", f"R² without top {k}") for k in LEAVE_OUT),
        ):
            out[name] = [f"{v:.{digits}f}" if np.isfinite(v) else "" for v in df[col].astype(float)]
        return out.reset_index(drop=True)

    def offtarget(self) -> pd.DataFrame:
        return self.table("offtarget")

    def preference(self) -> pd.DataFrame:
        return self.table("preference")

    def targets(self) -> pd.DataFrame:
        return self.table("targets")

    def poisoning(self) -> pd.DataFrame | None:
        """The controlled-poisoning read-out (planted-pattern rate, fraction removed, on-target
        preference and gain kept); None when the run's data was not poisoned."""
        return self.table("poisoning") if (self.path / "poisoning.parquet").exists() else None

    def judges(self) -> pd.DataFrame | None:
        """The refusal judge's agreement with people (``data.judges.agreement``); None when the
        evaluation skipped it (``judge_agreement_n=0`` or no behaviour sets)."""
        return self.table("judges") if (self.path / "judges.parquet").exists() else None

    def judge_table(self, digits: int = 2) -> pd.DataFrame | None:
        """``judges()`` as people read it: a row per family × reading, "value [low, high]" cells."""
        df = self.judges()
        return None if df is None else format_agreement(df, digits)

    @property
    def refusal_judge(self) -> str:
        """The name of the judge that scored the refusal rows."""
        return str(self.manifest.get("refusal_judge", "phrase list"))

    def comparison(self) -> pd.DataFrame:
        return self.table("comparison")

    def generations(self) -> pd.DataFrame:
        with open(self.path / "generations.jsonl") as fh:
            return pd.DataFrame([json.loads(line) for line in fh if line.strip()])

    def comparison_table(self, digits: int = 3) -> pd.DataFrame:
        """The comparison as one wide table: a row per metric, a column per model, "value [low,
        high]" cells; a row with no signal at this scale says so in every cell (``no_signal_rows``)."""
        df = self.comparison()

        def cell(r) -> str:
            if not np.isfinite(r["value"]):  # an R² over < 3 concepts (or constant ones) is undefined: say why
                return (
                    f"n/a ({int(r['n'])} concepts in the fit)"
                    if r["group"] == "predicted vs actual" and np.isfinite(r["n"])
                    else ""
                )
            s = f"{r['value']:.{digits}f}"
            if np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]):
                s += f" [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
            return s

        df = df.assign(cell=df.apply(cell, axis=1))
        df.loc[no_signal_rows(df), "cell"] = NO_SIGNAL
        wide = df.pivot_table(index=["group", "metric"], columns="model", values="cell", aggfunc="first", sort=False)
        return wide[[m for m in self.models if m in wide.columns]].fillna("")

    def head_to_head(self) -> pd.DataFrame:
        """The experiment's main table, one row per trained model (plain DPO, then each
        intervention): each planted concept's fraction removed (to suppress) or kept (to keep),
        the held-out preference accuracy, how many concepts moved off target (BH), the
        predicted-vs-actual R² of the whole-response view, the R² and sign agreement of the
        spill-over its plan predicted against the shift measured (relative to plain DPO), and the
        median training step time over plain DPO's. Value, low and high columns; ``head_to_head_table`` formats them."""
        poison = self.poisoning()
        pref = self.preference().set_index("model")
        r2 = self.r2()
        r2 = r2[r2["view"] == "overall"].set_index("model")
        off = self.offtarget()
        plan_r2 = self.plan_r2()
        if plan_r2 is not None:
            plan_r2 = plan_r2[plan_r2["concepts"] == "spill-over"].set_index("model")
        steps = self.manifest.get("train_step_seconds") or {}
        rows = []
        for m in self.models:
            if m == BASE:
                continue
            row: dict = {"model": m}
            if poison is not None:
                for r in poison[poison["model"] == m].itertuples():
                    what = "removed" if getattr(r, "role", "suppress") == "suppress" else "kept"
                    scope = getattr(r, "scope", "all")
                    # a topic-only plant: in and outside its topic too
                    name = r.kind if scope == "all" else f"{r.kind} ({scope})"
                    for suffix in ("", "_ci_low", "_ci_high"):
                        row[f"{name} {what}{suffix}"] = getattr(r, f"fraction_{what}{suffix}")
                    row.update(
                        {
                            f"{name} rate": r.planted_rate,
                            f"{name} rate_ci_low": r.planted_rate_ci_low,
                            f"{name} rate_ci_high": r.planted_rate_ci_high,
                        }
                    )
            if m in pref.index:
                row.update(
                    {
                        "preference accuracy": pref.at[m, "accuracy"],
                        "preference accuracy_ci_low": pref.at[m, "ci_low"],
                        "preference accuracy_ci_high": pref.at[m, "ci_high"],
                    }
                )
            row["off-target movers"] = int((off["model"] == m).sum())
            if m in r2.index:
                row.update(
                    {
                        "R² (overall)": r2.at[m, "r2"],
                        "R² (overall)_ci_low": r2.at[m, "ci_low"],
                        "R² (overall)_ci_high": r2.at[m, "ci_high"],
                    }
                )
            if plan_r2 is not None and m in plan_r2.index:
                p = plan_r2.loc[m]
                row.update(
                    {
                        "spill-over R² (plan)": p["r2"],
                        "spill-over R² (plan)_ci_low": p["ci_low"],
                        "spill-over R² (plan)_ci_high": p["ci_high"],
                        "spill-over sign agreement (plan)": p["sign_agreement"],
                    }
                )
            s, plain_step = steps.get(m), steps.get(plain_reference(m))
            row["step-time ratio"] = s / plain_step if s and plain_step else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def order_spread(self) -> pd.DataFrame | None:
        """For every run trained in more than one order (``PipelineConfig.order_seeds``): each
        head-to-head figure per order, with its mean, lowest, highest and range — how much of a
        "removed" or "kept" the order of the training pairs alone moves. Each intervention is read
        against plain DPO of its own order. None when no run was trained in another order."""
        h2h = self.head_to_head()
        if h2h.empty:
            return None
        orders = {m: v.get("order") for m, v in self.manifest.get("models", {}).items()}
        h2h = h2h.assign(run=[order_of(m)[0] for m in h2h["model"]], order=[orders.get(m) for m in h2h["model"]])
        runs = [r for r, g in h2h.groupby("run", sort=False) if len(g) > 1]
        if not runs:
            return None
        metrics = [
            c for c in h2h.columns if c not in ("model", "run", "order") and not c.endswith(("_ci_low", "_ci_high"))
        ]
        rows = []
        for run in runs:
            g = h2h[h2h["run"] == run]
            for metric in metrics:
                v = g[metric].astype(float).to_numpy()
                ok = np.isfinite(v)
                if not ok.any():
                    continue
                low, high = float(v[ok].min()), float(v[ok].max())
                per_order = "; ".join(f"{o}: {x:.2f}" for o, x in zip(g["order"], v) if np.isfinite(x))
                row = {"run": run, "metric": metric, "orders": len(g), "mean": float(v[ok].mean())}
                rows.append({**row, "min": low, "max": high, "range": high - low, "per_order": per_order})
        return pd.DataFrame(rows)

    def head_to_head_table(self, digits: int = 2) -> pd.DataFrame:
        """``head_to_head()`` as people read it: "value [low, high]" cells, a row per model."""
        df = self.head_to_head()
        out = pd.DataFrame({"model": df["model"]})
        for col in df.columns:
            if col == "model" or col.endswith(("_ci_low", "_ci_high")):
                continue
            lo, hi = df.get(f"{col}_ci_low"), df.get(f"{col}_ci_high")

            def cell(i, v, lo=lo, hi=hi, col=col):
                if isinstance(v, (int, np.integer)) and col == "off-target movers":
                    return str(int(v))
                if v is None or not np.isfinite(v):
                    return ""
                s = f"{v:.{digits}f}"
                if lo is not None and np.isfinite(lo.iloc[i]) and np.isfinite(hi.iloc[i]):
                    s += f" [{lo.iloc[i]:.{digits}f}, {hi.iloc[i]:.{digits}f}]"
                return s

            out[col] = [cell(i, v) for i, v in enumerate(df[col])]
        return out

    def __repr__(self) -> str:
        return f"EvalResult({len(self.models)} models: {', '.join(self.models)}; path={str(self.path)!r})"
