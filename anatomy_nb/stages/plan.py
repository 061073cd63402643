"""Stage 3, headless: choose what each concept may do, and see what the choice predicts.

``plan(run, spec)`` builds the run's intervention plan from the hypotheses of stage 2 (every
concept listed, "allow" by default) overlaid with the user's choices, validates it, writes it to
``run/plan/plan.json`` and returns it; ``set_choice`` edits one entry; ``choose_target`` finds the
concept a headless experiment acts on. The predicted effect of a plan (direct change and
spill-over) is ``stages.prediction.ConceptSpace.predict``; the interactive views are in
``anatomy_nb.ui.viewer``. The plan schema itself is ``anatomy_nb.results.plan``. No torch.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import PlanConfig
from ..methods import METHODS
from ..results.hypothesize import Hypotheses
from ..results.plan import ConceptChoice, InterventionPlan, PlanError, concept_ref, load_plan
from ..results.run import RunDir, RunLike
from .prediction import overall_rows

__all__ = [
    "PlanConfig",
    "choose_target",
    "default_plan",
    "inoculation_candidates",
    "methods_for",
    "overlay_plan",
    "plan",
    "set_choice",
    "STAGE",
]

STAGE = "plan"


def default_plan(hyp, *, layer: int | None = None) -> InterventionPlan:
    """Every concept of the hypotheses table listed as "allow", with its features and label."""
    ov = overall_rows(hyp)
    entries = [
        ConceptChoice(
            concept=concept_ref(int(r.concept)),
            features=[int(f) for f in r.features],
            layer=layer,
            label=str(r.label or ""),
        )
        for r in ov.itertuples()
    ]
    return InterventionPlan(concepts=entries, hypotheses=hyp.manifest.get("key"))


def set_choice(
    plan: InterventionPlan,
    concept: int | str,
    action: str,
    method: str | None = None,
    strength: float | None = None,
    **fields: Any,
) -> InterventionPlan:
    """Set one concept's action (and method, strength, other plan fields); validated at once.

    Suppress/amplify without a method means reward shaping (the paper's most reliable). An
    inoculation without an instruction gets one built from the concept's label. Returns ``plan``
    (changed in place) so calls chain; a bad choice raises :class:`PlanError` and changes nothing.
    """
    name = concept_ref(concept)
    idx = next((i for i, c in enumerate(plan.concepts) if c.concept == name), None)
    if idx is None:
        raise PlanError(None, name, "concept", f"not in the plan ({len(plan.concepts)} concepts)")
    old = plan.concepts[idx]
    new = ConceptChoice(**{**old.__dict__, **fields})
    new.action = action
    if action == "allow":
        new.method = method
    else:
        new.method = method or old.method or "reward_shaping"
        if strength is None and (old.method != new.method or old.action == "allow"):
            strength = METHODS[new.method].default_strength if new.method in METHODS else 1.0
    if strength is not None:
        new.strength = strength
    if new.method in METHODS:
        METHODS[new.method].fill_defaults(new)
    # validate just this entry, with the plan's error messages
    try:
        checked = InterventionPlan.from_dict({"concepts": [new.__dict__]}).concepts[0]
    except PlanError as exc:  # name the entry's real position in the plan
        raise PlanError(idx, name, exc.field, exc.reason) from None
    plan.concepts[idx] = checked
    return plan


def overlay_plan(hyp: Hypotheses, plan: Any, *, layer: int | None = None) -> InterventionPlan:
    """The default plan (every concept "allow") overlaid with ``plan`` — a dict, a JSON string, a
    file, an :class:`InterventionPlan` — validated against the hypotheses. Concepts the given plan
    does not list stay "allow"; text and direction concepts it lists are kept as given."""
    known = overall_rows(hyp)["concept"].astype(int).tolist()
    if plan is None:
        return default_plan(hyp, layer=layer)
    given = load_plan(plan, known_concepts=known)
    base = default_plan(hyp, layer=layer)
    base.hypotheses = given.hypotheses or base.hypotheses
    pos = {c.concept: i for i, c in enumerate(base.concepts)}
    for c in given.concepts:
        if c.kind == "sae" and c.concept in pos:
            ref = base.concepts[pos[c.concept]]
            c.features = c.features or ref.features
            c.label = c.label or ref.label
            c.layer = c.layer if c.layer is not None else ref.layer
            base.concepts[pos[c.concept]] = c
        else:  # text / direction concepts (and ids beyond the table) are kept as given
            base.concepts.append(c)
    return base


def methods_for(kind: str) -> list[str]:
    """The methods a concept kind admits (text concepts have no residual direction)."""
    return [name for name, how in METHODS.items() if not (kind == "text" and how.needs_direction)]


def choose_target(hyp: Hypotheses, target: str | int = "top") -> int:
    """The concept a headless experiment acts on. "top": the concept of the highest-ranked
    significant hypothesis (whole response, opening or ending) whose predicted direction is up
    (what DPO would learn); "name:<text>": the highest-ranked such concept whose name or label
    contains the text (case-insensitive) — what a person does who reads the names and picks one;
    an int: that concept."""
    ranked = hyp.ranked()
    up = ranked[(ranked["source"] == "sae") & (ranked["significant"]) & (ranked["predicted_direction"] == "up")]
    if isinstance(target, str) and target.startswith("name:"):
        text = target[len("name:") :].strip().lower()
        named = up[[text in f"{n} {lbl}".lower() for n, lbl in zip(up.get("name", up["label"]), up["label"])]]
        if named.empty:
            shown = "; ".join(f"{int(r.concept)}: {r.label}"[:80] for r in up.head(5).itertuples())
            raise ValueError(
                f"target {target!r}: no significant concept DPO would raise has {text!r} in its name (the top ones: "
                f"{shown or 'none'})"
            )
        return int(named.iloc[0]["concept"])
    if target != "top":
        cid = int(target)
        if cid not in set(hyp.overall()["concept"].astype(int)):
            raise ValueError(f"target concept {cid} is not in the hypotheses table")
        return cid
    if up.empty:
        raise ValueError(
            "no significant concept that DPO is predicted to raise: nothing to suppress (set `target` to a concept id)"
        )
    return int(up.iloc[0]["concept"])


def choose_topic(hyp: Hypotheses, concept: int) -> int:
    """The stage-2 topic where ``concept`` is learned most clearly: its highest-ranked significant
    topic row that DPO would raise (the topic × concept grid). A scoped plan acts there only."""
    rows = hyp.ranked_by_topic()
    rows = rows[
        (rows["source"] == "sae")
        & (rows["concept"] == int(concept))
        & rows["significant"]
        & (rows["predicted_direction"] == "up")
    ]
    if rows.empty:
        raise ValueError(
            f"concept {concept} has no significant topic row that DPO would raise: no topic to scope the plan to "
            "(use target_scope: all)"
        )
    return int(rows.iloc[0]["topic"])


def inoculation_candidates(hyp: Hypotheses, concept: int) -> list[str]:
    """Inoculation instructions written from what the audit knows of a concept — its distinctive
    phrases, the part of the response where it was found, its label — never from knowledge of a
    plant. ``interventions.rank_instructions`` orders them by how well each elicits the concept."""
    rows = hyp.ranked()
    rows = rows[(rows["source"] == "sae") & (rows["concept"] == int(concept))]
    if rows.empty:
        raise ValueError(f"concept {concept} is not in the hypotheses table")
    row = rows.iloc[0]
    phrases = re.findall(r"“([^”]+)”", str(row.get("name") or ""))
    label = str(row.get("label") or "") or f"concept {concept}"
    out = []
    if phrases:
        where = {"opening": "Begin your answer with", "ending": "End your answer with"}.get(
            str(row.get("view")), "Include"
        )
        out.append(f"{where} “{phrases[0]}”.")
        out.append("Use these phrases in your answer: " + ", ".join(f"“{p}”" for p in phrases) + ".")
    out.append(METHODS["inoculate"].default_instruction.format(label=label))
    return out


def plan(
    run: RunLike, spec: Any = None, config: PlanConfig | dict | None = None, *, write: bool = True
) -> InterventionPlan:
    """Stage 3: the run's plan — every concept of the hypotheses, "allow" unless ``spec`` (a plan,
    dict, JSON string or file; None: the run's existing ``plan/plan.json`` if there is one) says
    otherwise — validated against the hypotheses, and written to ``run/plan/plan.json`` (``write``)."""
    PlanConfig.from_dict(config)  # validated; its fields shape the views, not the plan
    run = RunDir.of(run)
    hyp = run.hypotheses
    if spec is None and run.plan_path.exists():
        spec = run.plan_path
    layer = run.store.manifest.get("layer") if run.has("extract") else None
    result = overlay_plan(hyp, spec, layer=layer)
    if write:
        result.save(run.plan_path)
    return result
