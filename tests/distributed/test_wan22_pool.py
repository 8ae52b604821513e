"""The Wan2.2 TI2V-5B architecture (48 latent channels, 16 x 16 pixels a latent) on a worker pool of two CPU ranks
(gloo): the ranks' noise, prefix and block buffers and the pool's result take the model's latent space. P1 gives the
single process's latents bit for bit, a prefix included; P2 agrees to fp32 rounding (test_distributed.py's TOL and
its reasons)."""
import pytest
import torch
from conftest import TINY_5B
from oracles import starting_noise

from cascade_core.distributed import WorkerPool
from cascade_core.model.dit import WanModel
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

W, H = 64, 32  # Wan2.2 latents 4 x 2
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool("cpu,cpu", threads=1, timeout=60)
    yield p
    p.close()


def test_pool_runs_wan22_latents_as_one_process(pool):
    model = WanModel.random(TINY_5B, seed=0)
    prompts = PromptSchedule.single(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)))
    prefix = starting_noise(4, (1, 48, 1, H // 16, W // 16))
    p1 = CascadeConfig(frames_per_block=2, parallel=1)
    one = generate(model, prompts, p1, blocks=3, width=W, height=H, seed=7, prefix=prefix)
    two = pool.generate(model, prompts, p1, blocks=3, width=W, height=H, seed=7, prefix=prefix)
    assert two.latents.shape == (1, 48, 7, H // 16, W // 16) and torch.equal(two.latents, one.latents)
    p2 = CascadeConfig(frames_per_block=2, parallel=2)
    one = generate(model, prompts, p2, blocks=3, width=W, height=H, seed=7)
    two = pool.generate(model, prompts, p2, blocks=3, width=W, height=H, seed=7)
    assert two.latents.shape == (1, 48, 6, H // 16, W // 16)
    assert (two.latents - one.latents).abs().max() <= TOL
