"""Preventative steering: while training, sign·strength·v_c is added to the residual stream at the
concept's layer (suppress adds the concept, so the policy need not learn it). The reference pass is
not steered: a steered reference would cancel exactly the margin steering explains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Method, register


@register
class Steer(Method):
    name = "steer"
    default_strength = 4.0
    strength_range = (0.0, 1000.0, False)
    needs_direction = True

    def forward_edit(self, choice: Any, source: Any, mean_residual: Callable[[int], Any]) -> dict:
        return {
            "kind": "steer",
            "vector": choice.sign * choice.strength * source.steering_vector(),
            "in_reference": False,
        }
