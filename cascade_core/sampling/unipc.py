"""LongLive 2.0's step rule: each block solved by its own UniPC multistep solver (order 2, B(h) = e^h - 1,
predicting x0), from the block's initial noise alone, with no random draw after it.

UniPC is the predictor-corrector of Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models" (arXiv 2302.04867). LongLive 2.0 (NVlabs/LongLive@7860ad9) runs it per block:
``pipeline/causal_diffusion_inference.py:566-609`` (a new ``FlowUniPCMultistepScheduler`` for every block,
``set_timesteps(sampling_steps, shift=5)`` at l.892-899, the model's flow v at every timestep, one scheduler step
after each), with the scheduler of ``wan_5b/utils/fm_solvers_unipc.py`` (solver_order 2, bh2, predict_x0,
lower_order_final; the table l.109-134 and 184-213, x0 = x - sigma*v l.279-350, UniP l.352-486, UniC l.488-628,
the step l.657-741). The rules below are written from those definitions, in closed form.

Timesteps (:func:`unipc_levels`): s_k = 0.999 + k*(0 - 0.999)/S for k < S (numpy's linspace in float64 from the
float32 0.999), sigma_k = shift*s_k / (1 + (shift-1)*s_k), sigma_S = 0; the model sees t_k = int(1000*sigma_k)
(truncated): 4 steps at shift 5 -> 999, 937, 833, 624; 2 steps -> 999, 833. Sigmas are kept as float32 numbers.

The update, with alpha = 1 - sigma, lambda = log(alpha/sigma), m_i = x_i - sigma_i v_i (the x0 prediction of
step i, from the x the model saw). UniPC's terms alpha_t (e^{-h} - 1) equal sigma_t/sigma_s - 1 for alpha = 1 -
sigma, so every update reads x' = r x + (1 - r) (m + corrections) with r the ratio of the two sigmas:

- corrector (UniC) at step i >= 1, from x^c_{i-1} (the state the last predictor started from), r = sigma_i /
  sigma_{i-1}: x^c_i = r x^c_{i-1} + (1 - r) (m_{i-1} + rho_1 (m_i - m_{i-1}) + rho_0 (m_{i-2} - m_{i-1}) / r_k),
  of the order of the predictor before it: order 1 (i = 1): rho_1 = 1/2, rho_0 = 0; order 2: h = lambda_i -
  lambda_{i-1}, phi = e^{-h} - 1, b_1 = (phi/(-h) - 1)/phi, b_2 = 2((phi/(-h) - 1)/(-h) - 1/2)/phi,
  r_k = (lambda_{i-2} - lambda_{i-1})/h, and (rho_0, rho_1) solve [[1, 1], [r_k, 1]] rho = (b_1, b_2):
  rho_0 = (b_1 - b_2)/(1 - r_k), rho_1 = (b_2 - r_k b_1)/(1 - r_k). Step 0 has no corrector (x^c_0 = x_0);
- predictor (UniP) at step i, r = sigma_{i+1}/sigma_i: x_{i+1} = r x^c_i + (1 - r) (m_i + (m_{i-1} - m_i)/(2 r_k))
  with r_k = (lambda_{i-1} - lambda_i)/(lambda_{i+1} - lambda_i) at order 2 (the reference's rho_p = 1/2), the
  last term absent at order 1: at step 0 (warm-up) and at the last step (lower_order_final). The last step goes
  to sigma 0 (r = 0): the block's result is m_{S-1} (its corrector cannot reach it and is skipped).

Arithmetic in float64 (the coefficients from the float32 sigmas), rounded once to the latents' dtype; a block's
state (x^c, m_{i-1}, m_{i-2}) is kept in float32 (float64 for float64 latents). The reference computes in the
latents' dtype (bf16 in its runs), so bf16 results agree within bf16 rounding, float32 ones within float32
rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

TRAIN_STEPS = 1000
SIGMA_MAX = float(torch.tensor(0.999, dtype=torch.float32))  # 1 - 1/1000 of the training table, read as float32


def unipc_levels(steps: int, shift: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(timesteps [steps] the model sees, sigmas [steps + 1] ending at 0, float32 values) of ``steps`` UniPC
    steps at ``shift`` (module docstring; ``fm_solvers_unipc.py:109-134, 184-213``). Raises ValueError for
    steps < 1 or a shift that is not a positive finite number."""
    if type(steps) is not int or steps < 1:
        raise ValueError(f"the UniPC solver takes a step count >= 1, got {steps!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    delta = (0.0 - SIGMA_MAX) / steps
    s = [k * delta + SIGMA_MAX for k in range(steps)]  # numpy's linspace (float64), endpoint 0 left out
    sig = [shift * v / (1 + (shift - 1) * v) for v in s]
    timesteps = tuple(int(v * TRAIN_STEPS) for v in sig)  # int64 of float64: truncated
    sigmas = tuple(float(v) for v in torch.tensor(sig + [0.0], dtype=torch.float64).float())
    return timesteps, sigmas


@dataclass
class SolverState:
    """One block's UniPC state between its steps: ``base`` x^c (the sample the last predictor started from)
    and the x0 predictions of the last steps, newest last (at most two), all [1, C, frames, h, w] in float32
    (float64 for float64 latents)."""

    base: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)


class UniPCSchedule:
    """A block's UniPC solver over ``steps`` steps at ``shift``: ``timesteps`` (float32 tensor [steps], what
    the model sees), ``sigmas`` (float32 tensor [steps + 1]), ``steps`` (the timesteps as ints) and
    :meth:`step`. Raises ValueError as :func:`unipc_levels`."""

    def __init__(self, steps: int, shift: float):
        self.steps, sig = unipc_levels(steps, shift)
        self.shift = shift
        self.timesteps = torch.tensor(self.steps, dtype=torch.float32)
        self.sigmas = torch.tensor(sig, dtype=torch.float32)
        lam = [math.log(1 - s) - math.log(s) if s > 0 else math.inf for s in sig]
        n = len(self.steps)
        order = [1 if i in (0, n - 1) else 2 for i in range(n)]  # the predictor's (warm-up, lower_order_final)
        # predictor of step i: (r, c) with x_{i+1} = r x^c + (1 - r)(m_i + c (m_{i-1} - m_i))
        self._predictor = [(sig[i + 1] / sig[i],
                            0.0 if order[i] == 1 else 0.5 * (lam[i + 1] - lam[i]) / (lam[i - 1] - lam[i]))
                           for i in range(n)]
        # corrector of step i >= 1: (r, c_new, c_old) with
        # x^c_i = r x^c_{i-1} + (1 - r)(m_{i-1} + c_new (m_i - m_{i-1}) + c_old (m_{i-2} - m_{i-1}))
        self._corrector = [None] + [self._corrector_of(i, order[i - 1], sig, lam) for i in range(1, n)]

    @staticmethod
    def _corrector_of(i: int, order: int, sig, lam) -> tuple[float, float, float]:
        r = sig[i] / sig[i - 1]
        if order == 1:
            return r, 0.5, 0.0
        h = lam[i] - lam[i - 1]
        hh = -h
        phi = math.expm1(hh)
        g1 = phi / hh - 1
        b1, b2 = g1 / phi, 2 * (g1 / hh - 0.5) / phi
        rk = (lam[i - 2] - lam[i - 1]) / h
        rho0, rho1 = (b1 - b2) / (1 - rk), (b2 - rk * b1) / (1 - rk)
        return r, rho1, rho0 / rk

    def __len__(self) -> int:
        return len(self.steps)

    def step(self, state: SolverState, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Step ``i`` of a block: ``x`` the latents the model saw at timestep i, ``v`` its flow prediction
        (both [1, C, frames, h, w]); ``state`` carries the block's solver from step i - 1 (a fresh
        :class:`SolverState` at step 0) and is updated. Returns x_{i+1} in x's dtype, after the last step the
        block's clean latents m_{S-1}."""
        m = x.double() - float(self.sigmas[i]) * v.double()
        r, c = self._predictor[i]
        if r == 0:  # the last step reaches sigma 0: its result is m itself
            state.base, state.outputs = None, []
            return m.to(x.dtype)
        if i == 0:
            base = x.double()
        else:
            rc, c_new, c_old = self._corrector[i]
            prev = state.outputs[-1].double()
            inner = prev + c_new * (m - prev)
            if c_old:
                inner = inner + c_old * (state.outputs[-2].double() - prev)
            base = rc * state.base.double() + (1 - rc) * inner
        inner = m if not c else m + c * (state.outputs[-1].double() - m)
        out = r * base + (1 - r) * inner
        keep = torch.promote_types(x.dtype, torch.float32)
        state.base = base.to(keep)
        state.outputs = (state.outputs + [m.to(keep)])[-2:]
        return out.to(x.dtype)


class UniPCRule:
    """The step rule of the UniPC solver (beside the re-noising rule, :class:`sampling.ticks.RenoiseRule`):
    each block in flight keeps its own :class:`SolverState` from its step 0 to its last, so any number of
    blocks may be in flight (the cascade). ``flow_of(block)``: the block's :class:`UniPCSchedule`. No random
    number is drawn."""

    def __init__(self, flow_of: Callable[[int], UniPCSchedule]):
        self.flow_of = flow_of
        self.states: dict[int, SolverState] = {}

    def step(self, block: int, stage: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``block``'s step ``stage`` (see :meth:`UniPCSchedule.step`); its state is dropped after the last."""
        if stage == 0:
            self.states[block] = SolverState()
        flow = self.flow_of(block)
        out = flow.step(self.states[block], stage, x, v)
        if stage + 1 == len(flow):
            del self.states[block]
        return out
