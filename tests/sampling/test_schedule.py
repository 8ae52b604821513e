"""Noise levels of a step list (the reference's numbers) and the cascade's tick plan."""

import pytest
import torch

from cascade_core.sampling.schedule import CascadeSchedule, FlowSchedule

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame



def test_flow_schedule_matches_reference_numbers():
    f = FlowSchedule()
    assert torch.allclose(f.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert torch.allclose(f.sigmas, torch.tensor([1.0, 0.9375, 0.833333, 0.625]), atol=1e-5)
    with pytest.raises(ValueError, match="strictly decrease"):
        FlowSchedule((500, 750))
    with pytest.raises(ValueError, match="0..1000"):
        FlowSchedule((1001, 500))
    with pytest.raises(ValueError, match="0..1000"):
        FlowSchedule((500, -1))


@pytest.mark.parametrize("warp", [True, False])
def test_a_last_step_0_is_t_0_at_the_tables_smallest_sigma(warp):
    # krea-ai/realtime-video: 5 steps linspace(1000, 0, 5) read through the table padded with t = 0; the
    # sigma of t = 0 is the nearest entry of the 1000-entry table, s = 0.001: 5 * 0.001 / (1 + 4 * 0.001)
    f = FlowSchedule((1000, 750, 500, 250, 0), shift=5.0, warp=warp)
    want = [1000.0, 937.5, 833.3333, 625.0, 0.0] if warp else [1000.0, 750.0, 500.0, 250.0, 0.0]
    assert torch.allclose(f.timesteps, torch.tensor(want), atol=1e-3)
    assert f.timesteps[-1].item() == 0.0
    assert f.sigmas[-1].item() == pytest.approx(0.005 / 1.004, rel=1e-5)


def test_without_clean_passes_a_block_ends_at_its_last_step():
    plan = CascadeSchedule(blocks=3, steps=5, clean_pass=False)
    assert [t.pairs for t in plan.ticks()] == [((b, s),) for b in range(3) for s in range(5)]
    assert not any(plan.is_clean(b, s) for b in range(3) for s in range(6))
    with pytest.raises(ValueError, match="1..5"):
        CascadeSchedule(blocks=3, steps=5, parallel=6, clean_pass=False)


# ---- the cascade ------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 2, 3, 4, 5])
def test_schedule_ticks(parallel):
    plan = CascadeSchedule(blocks=7, steps=4, parallel=parallel)
    ticks = plan.ticks()
    seen = {}
    for tick in ticks:
        assert 1 <= len(tick.pairs) <= parallel
        assert [b for b, _ in tick.pairs] == sorted({b for b, _ in tick.pairs})
        for b, stage in tick.pairs:
            seen.setdefault(b, []).append((tick.index, stage))
    for b, runs in seen.items():  # every block runs stages 0..4 in consecutive ticks, in order
        assert [s for _, s in runs] == list(range(5))
        assert [i for i, _ in runs] == list(range(runs[0][0], runs[0][0] + 5))
    assert sorted(seen) == list(range(7))
    if parallel == 1:
        assert len(ticks) == 7 * 5
    if parallel == 5:  # one block emitted per tick in steady state
        assert len(ticks) == 7 + 4 and max(len(t.pairs) for t in ticks) == 5


def test_schedule_rejects_bad_levels():
    with pytest.raises(ValueError, match="1..5"):
        CascadeSchedule(blocks=3, steps=4, parallel=6)
    with pytest.raises(ValueError, match="at least 1 block"):
        CascadeSchedule(blocks=-1, steps=4)


def test_folded_clean_pass_schedule():
    plan = CascadeSchedule(blocks=4, steps=4, parallel=1, fold_clean=True)
    ticks = plan.ticks()
    assert len(ticks) == 4 * 4 + 1 and plan.max_in_flight == 2
    shared = [t.pairs for t in ticks if len(t.pairs) == 2]
    assert shared == [((b, 4), (b + 1, 0)) for b in range(3)]  # clean pass of b with step 0 of b+1
    with pytest.raises(ValueError, match="fold-clean works at parallel 1 only"):  # refused, not dropped
        CascadeSchedule(blocks=4, steps=4, parallel=3, fold_clean=True)
