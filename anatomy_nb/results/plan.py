"""The intervention plan: which concepts the model may learn, and how each choice is applied.

One JSON schema serves both paths (docs/reference.md, "plan/plan.json"): the stage-3 toggles widget writes it, and a
headless run passes the same file (or dict) as a papermill parameter. Stage 4 (``train``) reads
it. This module is the schema and its validation only (no torch); ``stages.plan`` builds plans
from the hypotheses. Concept references (``"sae:12"``, ``"text:bold"``) are parsed here and
nowhere else.

A plan is a list of concept entries::

    {"format": 1,
     "hypotheses": "<hypotheses artifact key or null>",
     "concepts": [
        {"concept": "sae:12",              # "sae:<concept id>" | "text:<name>" | "direction:<name>"
         "action": "suppress",             # allow | suppress | amplify
         "method": "reward_shaping",       # reward_shaping (the default) | filter | inoculate | steer | ablate
         "strength": 1.0,
         "features": [3, 17, 40],          # sae: member features (filled from the hypotheses table)
         "pattern": null,                  # text: a regex or a text-statistic name
         "direction_file": null,           # direction: a .safetensors file with "directions" [n, d_model]
         "layer": null,                    # sae/direction: residual-stream layer (sae: the SAE's)
         "instruction": null,              # inoculate: the training-only instruction
         "filter_mode": "drop",            # filter: drop | flip
         "ablation": "zero",               # ablate: zero | mean
         "topic": null,                    # act on the prompts of one stage-2 topic only (its id)
         "prompts": null,                  # act on the prompts whose user turns match this regex only
         "label": "bold markdown"}]}

Strength means, per method: reward shaping λ (the shaped DPO loss is
−log σ(β·margin + λ·(s(y⁺) − s(y⁻))); the sign comes from the action, the number given is |λ|);
filter: the minimum per-pair score difference s(y⁺) − s(y⁻) that counts as "carried by the
concept" (in (0, 1] for scores in [0, 1]); inoculate: unused (1.0); steer: α, the multiple of the
unit concept direction added to the residual stream; ablate: the fraction of the projection
removed, in (0, 1].

``topic`` / ``prompts`` scope an entry to some prompts: a concept that stage 2 found in one topic's
row of the topic × concept grid is suppressed there and allowed elsewhere. Only the methods that
act on training pairs take a scope (reward shaping, filtering, inoculation); steering and ablation
edit the model on every prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write_json
from ..core.run import PLAN_FILE
from ..data.plant import user_turns_match
from ..methods import METHODS

__all__ = [
    "ACTIONS",
    "CONCEPT_KINDS",
    "ConceptChoice",
    "InterventionPlan",
    "PlanError",
    "concept_ref",
    "load_plan",
    "parse_concept",
    "sae_concept_id",
    "scope_mask",
    "PLAN_FILE",
]

FORMAT = 1
ACTIONS = ("allow", "suppress", "amplify")
CONCEPT_KINDS = ("sae", "text", "direction")
_SCOPE_FIELDS = ("topic", "prompts")


def scope_mask(
    choice: ConceptChoice,
    pairs: Sequence[Any],
    topic_of_prompt: Mapping[str, int] | None = None,
    index: int | None = None,
) -> np.ndarray | None:
    """Which of ``pairs`` a scoped entry acts on (None: unscoped, every pair): the pairs whose
    prompt is in its stage-2 ``topic`` (``topic_of_prompt``: ``Hypotheses.topic_of_prompt``) and
    whose user turns match its ``prompts`` regex (case-insensitive, as ``data.plant``'s topics).
    A prompt stage 2 never saw is in no topic."""
    if not choice.scoped:
        return None
    mask = np.ones(len(pairs), dtype=bool)
    if choice.topic is not None:
        if topic_of_prompt is None:
            raise PlanError(
                index, choice.concept, "topic", "a topic scope needs the run's stage-2 topics (run hypothesize first)"
            )
        known = sorted(set(topic_of_prompt.values()))
        if choice.topic not in known:
            raise PlanError(
                index, choice.concept, "topic", f"topic {choice.topic} is not one of stage 2's topics {known}"
            )
        mask &= np.array([topic_of_prompt.get(p.prompt_text) == choice.topic for p in pairs], dtype=bool)
    if choice.prompts is not None:
        mask &= user_turns_match([p.prompt for p in pairs], choice.prompts)
    return mask


def concept_ref(concept: int | str) -> str:
    """``12``, ``"12"`` or ``"sae:12"`` → ``"sae:12"``; other references are returned as given."""
    s = str(concept)
    return s if ":" in s else f"sae:{int(s)}"


def parse_concept(ref: str) -> tuple[str, str]:
    """``"sae:12"`` → ``("sae", "12")``; ``"text:bold"`` → ``("text", "bold")``."""
    kind, _, name = str(ref).partition(":")
    return (kind, name) if name else ("", kind)


def sae_concept_id(ref: str | int) -> int | None:
    """The stage-2 concept id of an ``sae:<id>`` reference (an int passes through), else None."""
    if isinstance(ref, (int,)) and not isinstance(ref, bool):
        return int(ref)
    kind, name = parse_concept(str(ref))
    return int(name) if kind == "sae" and name.isdigit() else None


class PlanError(ValueError):
    """An invalid plan; the message names the entry (index and concept) and the field."""

    def __init__(self, index: int | None, concept: str | None, field_name: str, reason: str, source: str | None = None):
        self.index, self.concept, self.field, self.reason, self.source = index, concept, field_name, reason, source
        where = f"{source}: " if source else ""
        entry = f"concept entry {index} ({concept!r})" if index is not None else "plan"
        super().__init__(f"{where}{entry}, field {field_name!r}: {reason}")


@dataclass
class ConceptChoice:
    concept: str
    action: str = "allow"
    method: str | None = None
    strength: float = 1.0
    features: list[int] = field(default_factory=list)
    pattern: str | None = None
    direction_file: str | None = None
    layer: int | None = None
    instruction: str | None = None
    filter_mode: str = "drop"
    ablation: str = "zero"
    label: str = ""
    topic: int | None = None
    prompts: str | None = None

    @property
    def scoped(self) -> bool:
        return self.topic is not None or self.prompts is not None

    @property
    def kind(self) -> str:
        return parse_concept(self.concept)[0]

    @property
    def name(self) -> str:
        return parse_concept(self.concept)[1]

    @property
    def sign(self) -> int:
        """+1 suppress, −1 amplify, 0 allow: the sign of λ (or of α) the action implies."""
        return {"suppress": 1, "amplify": -1}.get(self.action, 0)


@dataclass
class InterventionPlan:
    concepts: list[ConceptChoice] = field(default_factory=list)
    hypotheses: str | None = None  # key of the hypotheses artifact that "sae:<id>" refers to
    format: int = FORMAT

    @property
    def active(self) -> list[ConceptChoice]:
        """The entries that change training (action other than allow)."""
        return [c for c in self.concepts if c.action != "allow"]

    def by_method(self, method: str) -> list[ConceptChoice]:
        return [c for c in self.active if c.method == method]

    def to_dict(self) -> dict[str, Any]:
        # an unscoped entry is written without the scope fields, so plans (and the training keys
        # hashed from them) read as they did before scopes existed
        entries = [
            {k: v for k, v in asdict(c).items() if not (k in _SCOPE_FIELDS and v is None)} for c in self.concepts
        ]
        return {"format": self.format, "hypotheses": self.hypotheses, "concepts": entries}

    def save(self, path: str | Path) -> Path:
        """Write atomically; a directory means ``<dir>/plan.json``."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path = path / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str | None = None, known_concepts: Iterable[int] | None = None
    ) -> InterventionPlan:
        """Parse and validate. ``known_concepts``: the concept ids of the hypotheses table, so that
        an ``sae:<id>`` that does not exist is rejected here rather than at training time."""
        if not isinstance(data, Mapping):
            raise PlanError(None, None, "<root>", f"expected a JSON object, got {type(data).__name__}", source)
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise PlanError(
                None, None, "format", f"unsupported plan format {fmt!r} (this version reads {FORMAT})", source
            )
        entries = data.get("concepts", [])
        if not isinstance(entries, list):
            raise PlanError(None, None, "concepts", f"expected a list, got {type(entries).__name__}", source)
        known = None if known_concepts is None else {int(c) for c in known_concepts}
        allowed = set(ConceptChoice.__dataclass_fields__)
        out, seen = [], set()
        for i, raw in enumerate(entries):
            if not isinstance(raw, Mapping):
                raise PlanError(i, None, "<entry>", f"expected an object, got {type(raw).__name__}", source)
            concept = raw.get("concept")
            extra = set(raw) - allowed
            if extra:
                raise PlanError(
                    i, concept, sorted(extra)[0], f"unknown field (known: {', '.join(sorted(allowed))})", source
                )
            try:
                choice = ConceptChoice(**dict(raw))
            except TypeError as exc:
                raise PlanError(i, concept, "<entry>", str(exc), source) from None
            _validate(choice, i, source, known)
            if choice.concept in seen:
                raise PlanError(i, choice.concept, "concept", "listed twice", source)
            seen.add(choice.concept)
            out.append(choice)
        return cls(concepts=out, hypotheses=data.get("hypotheses"), format=FORMAT)


def _validate(c: ConceptChoice, i: int, source: str | None, known: set[int] | None) -> None:
    def err(field_name: str, reason: str) -> PlanError:
        return PlanError(i, c.concept, field_name, reason, source)

    if not isinstance(c.concept, str) or ":" not in c.concept or c.kind not in CONCEPT_KINDS or not c.name:
        raise err("concept", f"expected 'sae:<id>', 'text:<name>' or 'direction:<name>', got {c.concept!r}")
    if c.action not in ACTIONS:
        raise err("action", f"{c.action!r} is not one of {', '.join(ACTIONS)}")
    if c.kind == "sae":
        if not c.name.isdigit():
            raise err("concept", f"an SAE concept id is a non-negative integer, got {c.name!r}")
        if known is not None and int(c.name) not in known:
            raise err("concept", f"concept {c.name} is not in the hypotheses table ({len(known)} concepts)")
        if not isinstance(c.features, list) or not all(isinstance(f, int) and f >= 0 for f in c.features):
            raise err("features", "expected a list of non-negative feature indices")
    if c.kind == "text":
        if not c.pattern:
            raise err("pattern", "a text concept needs a regex or a text-statistic name")
        try:
            re.compile(c.pattern)
        except re.error as exc:
            raise err("pattern", f"not a valid regular expression: {exc}") from None
    if c.kind == "direction" and not c.direction_file:
        raise err("direction_file", "a direction concept needs a .safetensors file with its directions")
    if c.action == "allow":
        return
    if c.method is None:  # suppress / amplify without a method: reward shaping, the paper's most reliable
        c.method = "reward_shaping"
    if c.method not in METHODS:
        raise err("method", f"{c.method!r} is not one of {', '.join(METHODS)}")
    how = METHODS[c.method]
    if how.needs_direction and c.kind == "text":
        raise err(
            "method",
            f"{c.method} acts on the residual stream; a text concept has no direction (use "
            f"{', '.join(m for m, spec in METHODS.items() if not spec.needs_direction)})",
        )
    if how.suppress_only and c.action != "suppress":
        raise err("action", f"{c.method} can only suppress a concept")
    try:
        strength = float(c.strength)
    except (TypeError, ValueError):
        raise err("strength", f"expected a number, got {c.strength!r}") from None
    if problem := how.strength_error(strength):
        raise err("strength", problem)
    c.strength = strength
    if problem := how.check(c):
        raise err(*problem)
    if c.layer is not None and (not isinstance(c.layer, int) or c.layer < 0):
        raise err("layer", f"expected a non-negative integer, got {c.layer!r}")
    if c.topic is not None and (isinstance(c.topic, bool) or not isinstance(c.topic, int) or c.topic < 0):
        raise err("topic", f"expected a stage-2 topic id (a non-negative integer), got {c.topic!r}")
    if c.prompts is not None:
        try:
            re.compile(c.prompts)
        except (re.error, TypeError) as exc:
            raise err("prompts", f"not a valid regular expression: {exc}") from None
    if c.scoped and METHODS[c.method].needs_direction:
        raise err(
            "topic" if c.topic is not None else "prompts",
            f"{c.method} edits the model on every prompt; a topic or prompt scope applies to "
            f"{', '.join(m for m, spec in METHODS.items() if not spec.needs_direction)}",
        )


def load_plan(
    plan: InterventionPlan | Mapping[str, Any] | str | Path | None, *, known_concepts: Iterable[int] | None = None
) -> InterventionPlan:
    """A plan from an object, a dict (a papermill parameter), a JSON string, a file, or a run
    directory (its ``plan/plan.json``)."""
    if plan is None:
        return InterventionPlan()
    if isinstance(plan, InterventionPlan):
        return InterventionPlan.from_dict(plan.to_dict(), known_concepts=known_concepts)
    if isinstance(plan, Mapping):
        return InterventionPlan.from_dict(plan, known_concepts=known_concepts)
    text = str(plan)
    if isinstance(plan, str) and text.lstrip().startswith("{"):
        return InterventionPlan.from_dict(json.loads(text), source="<plan string>", known_concepts=known_concepts)
    path = Path(plan)
    if path.is_dir():  # a plan folder, or a run directory (its plan/plan.json)
        path = path / PLAN_FILE if (path / PLAN_FILE).exists() else path / "plan" / PLAN_FILE
    if not path.exists():
        raise FileNotFoundError(f"plan file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(None, None, "<json>", f"not valid JSON: {exc}", str(path)) from None
    return InterventionPlan.from_dict(data, source=str(path), known_concepts=known_concepts)
