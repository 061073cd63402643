"""Reward shaping: a per-response reward λ·s_c(y) inside DPO's log-sigmoid, so the concept's part of
the preference is explained before the weights change: −log σ(β·margin + λ·(s_c(y⁺) − s_c(y⁻))),
λ = sign·strength (suppress > 0). The paper's most reliable method and the plans' default."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Method, register


@register
class RewardShaping(Method):
    name = "reward_shaping"
    default_strength = 1.0
    strength_range = (0.0, 100.0, False)
    scored = True

    def offsets(self, choice: Any, scores: np.ndarray) -> np.ndarray:
        return choice.sign * choice.strength * np.asarray(scores, dtype=np.float64)

    def predict(self, signal: float, choice: Any) -> tuple[float, str]:
        return signal * (1 - choice.sign * choice.strength), "first-order (reward margin)"
