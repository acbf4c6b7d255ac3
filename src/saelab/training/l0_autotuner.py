"""The SynthSAEBench L0 autotuner: an integral controller on a sparsity-coefficient multiplier.

Follows `synth-sae-bench-experiments/saes/components/coefficient_autotuner.py` (defaults included):

    first observation:  L̄ ← L0_batch, rate ← 0        (so the EMA does not start from 0)
    later observations: L̄ ← 0.99·L̄ + 0.01·L0_batch;  rate ← 0.95·rate + 0.05·ΔL̄
    from start_step on: e = L̄ − target
                        gain = 0.01 if e·rate < 0 (already moving toward the target) else 1
                        adj  = 3e-4 · gain · tanh(10·|e| / target)
                        m ← m·(1 + adj) if e > 0 else m·(1 − adj);  m clamped to [0.01, 100]

The EMA and rate are updated on every call, also before `start_step` (as the reference does), so
the controller starts from a warm estimate. No adjustment happens when |e| ≤ deadband (default 0,
i.e. only exactly on target).

Use: the loss of step t uses `coefficient · multiplier`, then `update(t, L0 of that batch)` — the
reference updates after the forward whose loss used the previous multiplier.

Differences from the reference, both negligible: state is held in Python floats (float64, as the
reference's float64 buffers) rather than tensors, and tanh is evaluated in float64 (the reference
evaluates it on a float32 tensor). With integral gain 3e-4 the multiplier moves at most ~0.03% a
step, i.e. about ×e per 3,300 steps: it is meant for runs of tens of thousands of steps or more.
"""

from __future__ import annotations

import math
from typing import Any

from saelab.errors import ConfigError, require

_STATE_KEYS = ("smoothed_l0", "prev_smoothed_l0", "l0_rate", "multiplier", "initialized")


class L0Autotuner:
    """Integral controller that returns a multiplier steering a sparsity coefficient to a target L0."""

    def __init__(
        self,
        target_l0: float,
        start_step: int = 0,
        *,
        smoothing_factor: float = 0.99,
        rate_smoothing_factor: float = 0.95,
        integral_gain: float = 3e-4,
        min_multiplier: float = 1e-2,
        max_multiplier: float = 100.0,
        deadband: float = 0.0,
        gain_scale: float = 10.0,
        convergence_gain: float = 0.01,
    ):
        require(_finite(target_l0) and target_l0 > 0, "target_l0", target_l0, "must be a finite number > 0")
        require(isinstance(start_step, int) and start_step >= 0, "start_step", start_step, "must be an integer ≥ 0")
        require(0 <= smoothing_factor < 1, "smoothing_factor", smoothing_factor, "must be in [0, 1)")
        require(0 <= rate_smoothing_factor < 1, "rate_smoothing_factor", rate_smoothing_factor, "must be in [0, 1)")
        require(_finite(integral_gain) and 0 <= integral_gain < 1, "integral_gain", integral_gain, "must be in [0, 1)")
        require(_finite(min_multiplier) and min_multiplier > 0, "min_multiplier", min_multiplier, "must be > 0")
        require(
            _finite(max_multiplier) and max_multiplier >= min_multiplier,
            "max_multiplier",
            max_multiplier,
            f"must be ≥ min_multiplier={min_multiplier}",
        )
        require(_finite(deadband) and deadband >= 0, "deadband", deadband, "must be ≥ 0")
        require(_finite(gain_scale) and gain_scale > 0, "gain_scale", gain_scale, "must be > 0")
        require(0 <= convergence_gain <= 1, "convergence_gain", convergence_gain, "must be in [0, 1]")
        self.target_l0 = float(target_l0)
        self.start_step = start_step
        self.smoothing_factor = smoothing_factor
        self.rate_smoothing_factor = rate_smoothing_factor
        self.integral_gain = integral_gain
        self.min_multiplier = min_multiplier
        self.max_multiplier = max_multiplier
        self.deadband = deadband
        self.gain_scale = gain_scale
        self.convergence_gain = convergence_gain
        self.reset()

    def reset(self) -> None:
        self._smoothed_l0 = 0.0
        self._prev_smoothed_l0 = 0.0
        self._l0_rate = 0.0
        self._multiplier = 1.0
        self._initialized = False

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @property
    def smoothed_l0(self) -> float:
        return self._smoothed_l0

    @property
    def l0_rate(self) -> float:
        return self._l0_rate

    def update(self, step: int, batch_l0: Any) -> float:
        """Record the L0 of training step `step` and return the multiplier for the next step."""
        batch_l0 = float(batch_l0)  # also accepts a 0-d tensor
        if not math.isfinite(batch_l0):
            raise ConfigError("batch_l0", batch_l0, "must be finite")
        if not self._initialized:
            self._smoothed_l0 = self._prev_smoothed_l0 = batch_l0
            self._l0_rate = 0.0
            self._initialized = True
        else:
            self._prev_smoothed_l0 = self._smoothed_l0
            a = self.smoothing_factor
            self._smoothed_l0 = a * self._smoothed_l0 + (1 - a) * batch_l0
            r = self.rate_smoothing_factor
            self._l0_rate = r * self._l0_rate + (1 - r) * (self._smoothed_l0 - self._prev_smoothed_l0)

        if step < self.start_step:
            return self._multiplier
        error = self._smoothed_l0 - self.target_l0
        if abs(error) <= self.deadband:
            return self._multiplier
        # Damp the gain once L0 is already heading to the target, so momentum does not overshoot.
        gain = self.convergence_gain if error * self._l0_rate < 0 else 1.0
        adjustment = self.integral_gain * gain * math.tanh(abs(error) / self.target_l0 * self.gain_scale)
        factor = 1 + adjustment if error > 0 else 1 - adjustment
        self._multiplier = min(self.max_multiplier, max(self.min_multiplier, self._multiplier * factor))
        return self._multiplier

    def metrics(self) -> dict[str, float]:
        return {
            "autotuner/multiplier": self._multiplier,
            "autotuner/smoothed_l0": self._smoothed_l0,
            "autotuner/l0_rate": self._l0_rate,
        }

    # ----- exact resume -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "smoothed_l0": self._smoothed_l0,
            "prev_smoothed_l0": self._prev_smoothed_l0,
            "l0_rate": self._l0_rate,
            "multiplier": self._multiplier,
            "initialized": self._initialized,
            "target_l0": self.target_l0,
            "start_step": self.start_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError("autotuner state", sorted(state), f"is missing {missing}")
        # The controller's settings come from the run config; a mismatch means a different run.
        for key in ("target_l0", "start_step"):
            if key in state and float(state[key]) != float(getattr(self, key)):
                raise ConfigError(key, getattr(self, key), f"differs from the saved autotuner's {state[key]!r}")
        self._smoothed_l0 = float(state["smoothed_l0"])
        self._prev_smoothed_l0 = float(state["prev_smoothed_l0"])
        self._l0_rate = float(state["l0_rate"])
        self._multiplier = float(state["multiplier"])
        self._initialized = bool(state["initialized"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
