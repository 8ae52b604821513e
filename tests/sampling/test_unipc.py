"""LongLive 2.0's step rule (:mod:`cascade_core.sampling.unipc`, its UniPC solver in closed form) against UniPC
written here in the general recursion of the paper (Zhao et al., arXiv 2302.04867, Algorithms 1-2 with B(h) =
e^h - 1) as LongLive 2.0's scheduler structures it (NVlabs/LongLive@7860ad9 wan_5b/utils/fm_solvers_unipc.py):
a list of past x0 predictions, the divided differences D1_k = (m_k - m_0) / r_k, the system R rho = b solved with
``torch.linalg.solve`` (rho = 1/2 where the reference uses it), a corrector of the last predictor's order, the
predictor's order min(2, steps left, warm-up). The oracle knows nothing of the engine's coefficients.

Its numbers: sigma_k = 5 s_k / (1 + 4 s_k), s = linspace(float32 0.999, 0, S + 1) without its end, then 0; the
model sees int(1000 sigma_k): 4 steps -> 999, 937, 833, 624; 2 steps -> 999, 833 (the semantics note of issue
29 lists them, with sigmas 0.99980, 0.937265, 0.833055, 0.624687, 0).
"""
import pytest
import torch

from cascade_core.sampling.unipc import SolverState, UniPCRule, UniPCSchedule, unipc_levels


def reference_levels(steps, shift=5.0):
    """(timesteps, float32 sigmas with a final 0) as the scheduler's set_timesteps makes them."""
    top = float(torch.tensor(0.999, dtype=torch.float32))
    s = torch.linspace(top, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sig = shift * s / (1 + (shift - 1) * s)
    return [int(v) for v in (sig * 1000).tolist()], torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()


class ReferenceUniPC:
    """A fresh solver for one block: ``step(v, x)`` with the model's flow v at the current timestep and the
    x it saw returns the next x (after the last step: the clean estimate). Math in float64."""

    def __init__(self, steps, shift=5.0, order=2, corrector=True):
        self.corrector = corrector
        self.timesteps, self.sigmas = reference_levels(steps, shift)
        self.sigmas = self.sigmas.double()
        self.order, self.i, self.warm = order, 0, 0
        self.outputs, self.last, self.last_order = [], None, None

    def lam(self, k):
        sigma = self.sigmas[k]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _weights(self, order, hh):
        """R [order, order] and b [order] of the B(h) = e^hh - 1 variant (bh2)."""
        h_phi_1 = torch.expm1(hh)
        h_phi_k, fact, b = h_phi_1 / hh - 1, 1, []
        for k in range(1, order + 1):
            b.append(h_phi_k * fact / h_phi_1)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return torch.stack(b), h_phi_1

    def _update(self, x, m0, older, sig_t, sig_s, h, rhos, new=None):
        """x' = sigma_t/sigma_s x - alpha_t h phi_1 m0 - alpha_t B(h) (sum rho_k D1_k [+ rho_last (new - m0)])."""
        alpha_t = 1 - sig_t
        hh = -h
        h_phi_1 = torch.expm1(hh)
        res = sum((rho * d for rho, d in zip(rhos, older)), torch.zeros_like(x))
        if new is not None:
            res = res + rhos[-1] * (new - m0)
        return sig_t / sig_s * x - alpha_t * h_phi_1 * m0 - alpha_t * h_phi_1 * res

    def _differences(self, at, m0, h, count):
        """(r_k, D1_k) of the ``count`` older outputs before m0, whose steps are at - 1, at - 2, ..."""
        rks, d1s = [], []
        for k in range(1, count + 1):
            rk = (self.lam(at - k) - self.lam(at)) / h
            rks.append(rk)
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        return rks, d1s

    def step(self, v, x):
        x = x.double()
        i, n = self.i, len(self.timesteps)
        m = x - self.sigmas[i] * v.double()
        if i > 0 and self.corrector:  # the corrector (UniC), of the order of the predictor that made x
            p = self.last_order
            h = self.lam(i) - self.lam(i - 1)
            rks, d1s = self._differences(i - 1, self.outputs[-1], h, p - 1)
            if p == 1:
                rhos = torch.tensor([0.5], dtype=torch.float64)
            else:
                b, _ = self._weights(p, -h)
                r = torch.stack([torch.stack([torch.tensor(1.0, dtype=torch.float64) if j == p - 1 else rks[j] ** k
                                              for j in range(p)]) for k in range(p)])
                rhos = torch.linalg.solve(r, b)
            x = self._update(self.last, self.outputs[-1], d1s, self.sigmas[i], self.sigmas[i - 1], h, rhos, new=m)
        self.outputs = (self.outputs + [m])[-self.order:]
        p = min(self.order, n - i, self.warm + 1)
        self.last, self.last_order = x, p
        h = self.lam(i + 1) - self.lam(i)  # +inf at the last step (sigma 0)
        rks, d1s = self._differences(i, m, h, p - 1)
        rhos = torch.tensor([0.5], dtype=torch.float64) if p == 2 else torch.zeros(0, dtype=torch.float64)
        out = self._update(x, m, d1s, self.sigmas[i + 1], self.sigmas[i], h, rhos)
        self.warm, self.i = min(self.warm + 1, self.order), i + 1
        return out


def fake_model(x, t):
    """A smooth stand-in for the DiT's flow at timestep t: v depends on x and t (never on the solver)."""
    return torch.tanh(1.3 * x) * (0.2 + t / 1000) + 0.1 * torch.sin(3 * x + t / 100)


def run_oracle(steps, x):
    sol = ReferenceUniPC(steps)
    outs = []
    for t in sol.timesteps:
        x = sol.step(fake_model(x, float(t)), x)
        outs.append(x)
    return outs


def run_engine(steps, x):
    flow, state, outs = UniPCSchedule(steps, 5.0), SolverState(), []
    for i, t in enumerate(flow.timesteps.tolist()):
        x = flow.step(state, i, x, fake_model(x, t))
        outs.append(x)
    return outs


def start(dtype=torch.float64):
    return torch.randn(1, 48, 8, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)


def test_the_timesteps_and_sigmas_are_longlive2s():
    for steps, expected in ((4, (999, 937, 833, 624)), (2, (999, 833))):
        ts, sig = unipc_levels(steps, 5.0)
        assert ts == expected == tuple(reference_levels(steps)[0])
        assert sig == tuple(reference_levels(steps)[1].tolist())
    assert unipc_levels(4, 5.0)[1] == pytest.approx((0.99980, 0.937265, 0.833055, 0.624687, 0.0), abs=1e-6)
    assert UniPCSchedule(4, 5.0).timesteps.tolist() == [999.0, 937.0, 833.0, 624.0]


@pytest.mark.parametrize("steps", [4, 2, 1, 3, 6])
def test_the_closed_form_equals_the_general_recursion(steps):
    """Every step's output (predictor after corrector), 4 and 2 steps as LongLive 2.0 runs them and 1, 3, 6
    for the other orders' paths (order-2 correctors from step 2 on), in float64."""
    x = start()
    for ours, theirs in zip(run_engine(steps, x), run_oracle(steps, x), strict=True):
        assert (ours - theirs).abs().max() <= 1e-12 * theirs.abs().max()


def test_the_last_step_is_the_clean_estimate_and_the_first_an_euler_step():
    """The semantics note's two closed forms: step 0 x_1 = (s1/s0) x_0 + (1 - s1/s0) m_0; the last step's
    result is m = x - sigma v exactly (the corrector does not reach it)."""
    flow, state = UniPCSchedule(2, 5.0), SolverState()
    x0 = start()
    v0 = fake_model(x0, 999.0)
    s0, s1 = (float(s) for s in flow.sigmas[:2])
    x1 = flow.step(state, 0, x0, v0)
    m0 = x0 - s0 * v0
    assert (x1 - (s1 / s0 * x0 + (1 - s1 / s0) * m0)).abs().max() <= 1e-14
    v1 = fake_model(x1, 833.0)
    assert torch.equal(flow.step(state, 1, x1, v1), x1 - s1 * v1)


def test_float32_latents_stay_float32_and_agree_within_rounding():
    ours = run_engine(4, start(torch.float32))
    theirs = run_oracle(4, start(torch.float32))
    assert all(o.dtype == torch.float32 for o in ours)
    assert max((o.double() - t).abs().max().item() for o, t in zip(ours, theirs)) <= 1e-5


def test_each_block_keeps_its_own_solver():
    """Two blocks stepped in an interleaved order (the cascade) give what each gives alone."""
    flow = UniPCSchedule(4, 5.0)
    rule = UniPCRule(lambda block: flow)
    xs = {0: start(), 1: start() * 0.5 + 1}
    alone = {b: run_engine(4, xs[b])[-1] for b in xs}
    x = dict(xs)
    for b, stage in [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (0, 3), (1, 2), (1, 3)]:
        x[b] = rule.step(b, stage, x[b], fake_model(x[b], float(flow.timesteps[stage])))
    for b in xs:
        assert torch.equal(x[b], alone[b])
    assert rule.states == {}  # dropped after each block's last step


def test_the_comparison_separates_the_corrector():
    """The oracle without its corrector (UniP steps alone) lands far beyond the comparison's tolerance: the
    corrector is checked, not only the predictor."""
    x = start()
    plain = ReferenceUniPC(4, corrector=False)
    y = x
    for t in plain.timesteps:
        y = plain.step(fake_model(y, float(t)), y)
    assert (y - run_oracle(4, x)[-1]).abs().max() > 1e-3
