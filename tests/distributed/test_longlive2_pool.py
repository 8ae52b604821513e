"""LongLive 2.0 (family longlive-2: 48 latent channels, blocks of 8, a 32-frame window with a sink of 8) on a worker
pool of two CPU ranks (gloo): a schedule's scene cuts (the multi-shot sink's pinned block and the RoPE offset) and
the image latent of image-to-video reach every rank, so the pool gives the single process's latents: bit for bit
at P1, to fp32 rounding at P3 (test_distributed.py's TOL and its reasons)."""
import pytest
import torch
from conftest import TINY_5B as TINY48

from cascade_core.distributed import WorkerPool
from cascade_core.model.dit import WanModel
from cascade_core.sampling.config import PromptSchedule
from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import generate

W, H, BLOCKS, FRAMES = 64, 32, 6, 8  # Wan2.2 latents 2 x 4; six blocks of 8 roll the 32-frame window
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool("cpu,cpu", threads=1, timeout=60)
    yield p
    p.close()


def embedding(seed):
    return torch.randn(6, TINY48.text_dim, generator=torch.Generator().manual_seed(seed))


def schedule(cuts):
    """Prompts at blocks 0, 2 and 3, the switch at block 2 a scene cut where ``cuts``."""
    return PromptSchedule([(0, embedding(1)), (2, embedding(2)), (3, embedding(3))], scene_cuts=set(cuts))


@pytest.fixture(scope="module")
def model():
    return WanModel.random(TINY48, seed=0)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 48, BLOCKS * FRAMES, H // 16, W // 16, generator=torch.Generator().manual_seed(3))


def both(pool, model, noise, prompts, parallel=1, image=None):
    cfg = family_config("longlive-2", parallel=parallel)
    args = dict(blocks=BLOCKS, width=W, height=H, seed=0, noise=noise, image_latent=image)
    return generate(model, prompts, cfg, **args), pool.generate(model, prompts, cfg, **args)


def test_a_scene_cut_reaches_every_rank(pool, model, noise):
    one, two = both(pool, model, noise, schedule([2]))
    assert two.latents.shape == (1, 48, BLOCKS * FRAMES, H // 16, W // 16)
    assert torch.equal(two.latents, one.latents)
    uncut, _ = both(pool, model, noise, schedule([]))  # the cut is felt: a pool that dropped it could not pass
    assert (uncut.latents[:, :, 2 * FRAMES:] - one.latents[:, :, 2 * FRAMES:]).abs().max() > 100 * TOL


def test_the_image_latent_and_a_cut_reach_every_rank_at_p3(pool, model, noise):
    image = torch.randn(1, 48, 1, H // 16, W // 16, generator=torch.Generator().manual_seed(9))
    one, two = both(pool, model, noise, schedule([2]), parallel=3, image=image)
    assert torch.equal(two.latents[:, :, :1], image)
    assert (two.latents - one.latents).abs().max() <= TOL
    plain, _ = both(pool, model, noise, schedule([2]), parallel=3)  # the image is felt beyond its own frame
    assert (plain.latents[:, :, 1:] - one.latents[:, :, 1:]).abs().max() > 100 * TOL


def test_a_two_expert_model_is_refused_before_any_rank_works(pool):
    """A Wan2.2 A14B pair keeps a KV pool per expert in one process: the pool refuses it in one line, and stays
    usable."""
    from conftest import TINY

    from cascade_core.model.experts import ExpertPair

    pair = ExpertPair(WanModel.random(TINY, seed=0), WanModel.random(TINY, seed=1))
    prompts = PromptSchedule.single(torch.randn(5, TINY.text_dim))
    with pytest.raises(ValueError, match="two-expert model .* cannot run with several devices") as err:
        pool.generate(pair, prompts, family_config("causal-wan2.2-a14b"), blocks=2, width=W, height=H)
    assert "\n" not in str(err.value) and pool.alive
