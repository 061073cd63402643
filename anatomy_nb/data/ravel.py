"""RAVEL (Huang, Wu, Potts, Geva, Geiger 2024): entities with several attributes each, prompt
templates per attribute, and entity / template splits — the counterfactual data on which a concept
subspace (DAS, HyperDAS, or a set of SAE features) is measured.

Read from the vendored ``data/ravel/data.tgz`` (explanare/ravel, MIT) without unpacking it.
``counterfactual_pairs`` builds RAVEL's interchange examples: a *base* prompt asks attribute ``q``
of entity ``e_b``; a *source* prompt mentions entity ``e_s`` (one whose value of ``a`` the model
knows); an intervention on the target attribute ``a`` at the entity's last token should make the
base answer ``e_s``'s value when ``q == a`` (**Cause**) and keep ``e_b``'s value when ``q != a``
(**Isolate**).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..core.paths import data_dir

__all__ = ["ENTITY_TYPES", "RavelData", "counterfactual_pairs", "load_ravel"]

ENTITY_TYPES = ("city", "nobel_prize_winner", "occupation", "physical_object", "verb")


@dataclass(frozen=True)
class RavelData:
    """One entity type: ``entities[name][attribute] = value``, ``templates[attribute]`` (each with
    one ``%s`` for the entity), and the upstream ``entity_split`` / ``template_split`` (train / val /
    test)."""

    entity_type: str
    entities: dict[str, dict[str, str]]
    templates: dict[str, list[str]]
    entity_split: dict[str, str]
    template_split: dict[str, str]

    @property
    def attributes(self) -> list[str]:
        return list(self.templates)

    def entities_in(self, split: str) -> list[str]:
        return sorted(e for e, s in self.entity_split.items() if s == split and e in self.entities)


@lru_cache(maxsize=8)
def load_ravel(entity_type: str = "city") -> RavelData:
    """Load one RAVEL entity type from the vendored archive."""
    if entity_type not in ENTITY_TYPES:
        raise ValueError(f"unknown RAVEL entity type {entity_type!r}; types: {ENTITY_TYPES}")
    path = data_dir() / "ravel" / "data.tgz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the vendored RAVEL archive is missing (see data/DATA.md)")
    with tarfile.open(path, "r:gz") as tar:

        def read(name: str) -> dict:
            member = f"data/{name}"
            try:
                return json.load(tar.extractfile(member))  # type: ignore[arg-type]
            except KeyError:
                raise FileNotFoundError(f"{path}: no member {member}") from None

        entities = read(f"ravel_{entity_type}_entity_attributes.json")
        templates = read(f"ravel_{entity_type}_attribute_to_prompts.json")
        for attr, ts in templates.items():
            bad = [t for t in ts if t.count("%s") != 1]
            if bad:
                raise ValueError(
                    f"{path}: ravel_{entity_type}_attribute_to_prompts.json, attribute {attr!r}: template {bad[0]!r} "
                    "needs exactly one %s"
                )
        return RavelData(
            entity_type,
            entities,
            templates,
            read(f"ravel_{entity_type}_entity_to_split.json"),
            read(f"ravel_{entity_type}_prompt_to_split.json"),
        )


def counterfactual_pairs(
    data: RavelData,
    attribute: str,
    queried: list[str],
    entities: list[str],
    n: int,
    seed: int = 0,
    sources: list[str] | None = None,
) -> list[dict]:
    """``n`` interchange examples for the target ``attribute``: base entity and template (asking one of
    ``queried``), source entity and template (asking any attribute), and the expected answer —
    the source's value where the base asks ``attribute`` (kind ``cause``), the base's own value
    otherwise (kind ``isolate``). Half of the examples are of each kind when ``queried`` holds
    another attribute. Pairs whose two entities share the value would test nothing and are
    skipped. ``sources``: the entities a source may be (default: ``entities``); pass those whose
    value of ``attribute`` the model knows, as RAVEL does, since a source whose value the model does
    not hold has none to give: Cause would then be capped by the model's accuracy, not by the
    method."""
    unknown = [a for a in [attribute, *queried] if a not in data.templates]
    if unknown:
        raise ValueError(f"RAVEL {data.entity_type}: unknown attribute(s) {unknown}; attributes: {data.attributes}")
    rng = np.random.default_rng(seed)
    ents = [e for e in entities if all(data.entities[e].get(a) for a in queried)]
    if len(ents) < 2:
        raise ValueError(f"RAVEL {data.entity_type}: fewer than two entities have values for {queried}")
    pool = [e for e in (entities if sources is None else sources) if data.entities[e].get(attribute)]
    if not pool:
        raise ValueError(f"RAVEL {data.entity_type}: no source entity has a value of {attribute!r}")
    others = [q for q in queried if q != attribute]
    attributes = data.attributes

    out: list[dict] = []
    for _ in range(50 * n):
        if len(out) >= n:
            break
        kind = "cause" if not others or len(out) % 2 == 0 else "isolate"
        q = attribute if kind == "cause" else others[rng.integers(len(others))]
        base, source = ents[rng.integers(len(ents))], pool[rng.integers(len(pool))]
        if base == source or data.entities[base][attribute] == data.entities[source][attribute]:
            continue
        b_t, s_t = data.templates[q], data.templates[attributes[rng.integers(len(attributes))]]
        if not b_t or not s_t:
            continue
        expected = data.entities[source][attribute] if kind == "cause" else data.entities[base][q]
        out.append(
            {
                "kind": kind,
                "attribute": attribute,
                "queried": q,
                "base_entity": base,
                "base_template": b_t[rng.integers(len(b_t))],
                "source_entity": source,
                "source_template": s_t[rng.integers(len(s_t))],
                "expected": expected,
                "base_answer": data.entities[base][q],
            }
        )
    return out
