"""What every intervention method is, and the registry that names them.

A method is one class (``Method``) in one module of this package, registered by name with
``@register``. It says what it does to training — to the pairs (``select_pairs``, ``edit_prompts``),
to the loss (``offsets``: a per-response reward added inside DPO's log-sigmoid) or to the forward pass
(``forward_edit``) — what stage 3 predicts it will do (``predict``), which plan fields it takes
(``check``) and its default strength and range. Plans, configs, the viewer, training and the
prediction all ask the registry, so a new method is one module (import it before building a plan).

Nothing here imports torch: a forward edit is described as the keyword arguments of
``lm.ops.ResidualEdit`` and the training stage builds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = ["METHODS", "Method", "method", "method_variant", "register", "variants"]

#: name → the registered method (an instance), in registration order
METHODS: dict[str, Method] = {}


class Method:
    """One intervention method. Subclasses set the class attributes and override the hooks they
    use; every hook's default leaves training as it is."""

    name: ClassVar[str]
    #: the strength a new plan entry gets (the viewer's default too)
    default_strength: ClassVar[float] = 1.0
    #: (low, high, low inclusive?) of a valid strength; high is always inclusive
    strength_range: ClassVar[tuple[float, float, bool]] = (0.0, math.inf, False)
    #: it can only remove a concept (amplify is refused)
    suppress_only: ClassVar[bool] = False
    #: it acts on the residual stream, so a text concept (no direction) cannot use it; it also acts on
    #: every prompt, so it cannot be scoped to a topic or a prompt pattern
    needs_direction: ClassVar[bool] = False
    #: it needs the concept's score s_c(y) of every training response (stage 4 computes it)
    scored: ClassVar[bool] = False
    #: named variants for experiments that train several of one method: name → the plan fields set
    variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: ``<name>#<rank>`` picks a ranked candidate (inoculation instructions)
    takes_rank: ClassVar[bool] = False

    def fill_defaults(self, choice: Any) -> None:
        """Fill the fields a new plan entry of this method needs and the user left empty."""

    def check(self, choice: Any) -> tuple[str, str] | None:
        """(field, reason) when a plan entry's own fields are wrong for this method, else None."""
        return None

    def strength_error(self, strength: float) -> str | None:
        lo, hi, lo_inclusive = self.strength_range
        above_low = strength >= lo if lo_inclusive else strength > lo
        if math.isfinite(strength) and above_low and strength <= hi:
            return None
        return f"{strength} is outside {'[' if lo_inclusive else '('}{lo}, {hi}] for {self.name}"

    # --- what it does to training (stage 4) --------------------------------------------------------

    def select_pairs(
        self, pairs: list, entries: Sequence[Any], scores: Mapping[str, np.ndarray]
    ) -> tuple[list, np.ndarray, list[dict]] | None:
        """Drop or relabel training pairs: (new pairs, index of each in the input, one row per
        entry). ``entries`` are this method's planned concepts (``.choice``, ``.ref``, ``.source``)."""
        return None

    def edit_prompts(self, pairs: list, entries: Sequence[Any], scopes: Mapping[str, np.ndarray]) -> list | None:
        """Rewrite training prompts (a scoped entry: ``scopes[ref]``, a mask over ``pairs``)."""
        return None

    def offsets(self, choice: Any, scores: np.ndarray) -> np.ndarray | None:
        """(n_pairs, 2) per-response reward o(y) added to β·log-ratio inside DPO's loss (asked of a
        ``scored`` method only: ``scores`` are its concept's s_c(y⁺), s_c(y⁻) per training pair)."""
        return None

    def forward_edit(self, choice: Any, source: Any, mean_residual: Callable[[int], Any]) -> dict | None:
        """The keyword arguments of an ``lm.ops.ResidualEdit`` applied while training (the layer and
        concept are filled in by the caller); ``mean_residual(layer)`` estimates a layer's mean."""
        return None

    # --- what stage 3 predicts --------------------------------------------------------------------

    def carried(self, choice: Any, difference: np.ndarray) -> np.ndarray | None:
        """For a method that edits the data: the pairs it acts on, from each pair's chosen − rejected
        difference of the concept; the prediction is then exact. None for every other method."""
        return None

    def flips(self, choice: Any) -> bool:
        """Whether the carried pairs are relabelled (True) or dropped (False)."""
        return False

    def predict(self, signal: float, choice: Any) -> tuple[float, str]:
        """(the concept's DPO signal after the method, how that was obtained) from the signal before."""
        return signal * (1 - choice.sign), "nominal"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add the method to ``METHODS`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}: a method needs a name that is an identifier, got {name!r}")
    if name in METHODS and type(METHODS[name]) is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({type(METHODS[name]).__name__})")
    METHODS[name] = cls()
    return cls


def method(name: str) -> Method:
    """The registered method ``name``; a clear error listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"{name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every registered method's named variants: name → (method, the plan fields it sets)."""
    return {v: (m.name, dict(fields)) for m in METHODS.values() for v, fields in m.variants.items()}


def method_variant(name: str) -> tuple[str, dict[str, Any]]:
    """A method or variant name → (method, the plan fields it sets). Besides the variants' names, a
    sweep names its points: ``"reward_shaping@0.5"`` sets the strength (field ``strength``),
    ``"inoculate#2"`` takes the second-ranked instruction (field ``instruction_rank``);
    ``"ablate_mean@0.5"`` combines both kinds. A negative strength (``"reward_shaping@-1"``) amplifies
    the concept (the pipeline's plans); the methods that can only suppress refuse it."""
    base, at, value = str(name).partition("@")
    base, hash_, rank = base.partition("#")
    named = variants()
    if base in METHODS:
        name_of, fields = base, {}
    elif base in named:
        name_of, fields = named[base]
    else:
        raise ValueError(
            f"unknown method {name!r}; known: {list(METHODS) + list(named)}, each optionally with "
            "@<strength> (reward_shaping@0.5) or, for inoculate, #<rank> (inoculate#2)"
        )
    if at:
        try:
            fields["strength"] = float(value)
        except ValueError:
            raise ValueError(f"method {name!r}: the strength after @ must be a number, got {value!r}") from None
        if fields["strength"] < 0 and METHODS[name_of].suppress_only:
            raise ValueError(
                f"method {name!r}: a negative strength amplifies, and {name_of} can only suppress a concept"
            )
    if hash_:
        if not METHODS[name_of].takes_rank or not rank.isdigit() or int(rank) < 1:
            raise ValueError(
                f"method {name!r}: #<rank> (1, 2, …) picks an inoculation instruction by its rank; only inoculate "
                "takes it"
            )
        fields["instruction_rank"] = int(rank)
    return name_of, fields
