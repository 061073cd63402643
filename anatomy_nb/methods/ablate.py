"""Concept ablation fine-tuning (CAFT): while training, ``strength`` of the residual's projection on
the concept's orthonormal directions is removed (``ablation: zero``) or replaced by the mean
residual's (``mean``). Policy and reference share the ablation, so both start at log-ratio 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Method, register


@register
class Ablate(Method):
    name = "ablate"
    default_strength = 1.0
    strength_range = (0.0, 1.0, False)
    suppress_only = True
    needs_direction = True
    variants = {"ablate_zero": {"ablation": "zero"}, "ablate_mean": {"ablation": "mean"}}

    def check(self, choice: Any) -> tuple[str, str] | None:
        if choice.ablation not in ("zero", "mean"):
            return "ablation", f"{choice.ablation!r} is not 'zero' or 'mean'"
        return None

    def forward_edit(self, choice: Any, source: Any, mean_residual: Callable[[int], Any]) -> dict:
        return {
            "kind": "ablate",
            "basis": source.directions(),
            "mean": mean_residual(source.layer) if choice.ablation == "mean" else None,
            "fraction": choice.strength,
            "in_reference": True,
        }

    def predict(self, signal: float, choice: Any) -> tuple[float, str]:
        return signal * (1 - choice.strength), "first-order (projection removed)"
