"""The run's random numbers: the re-noising draw follows its documented rule."""

import torch
from oracles import noise_after_step

from cascade_core.sampling.noise import step_noise

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame



def test_step_noise_follows_its_documented_rule():
    like = torch.empty(1, 16, 2, 4, 8)
    draws = {}
    for seed, block, step in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (7, 3, 2), (2**40, 9, 3)]:
        got = step_noise(seed, block, step, like)
        assert torch.equal(got, noise_after_step(seed, block, step, like.shape)), (seed, block, step)
        draws[seed, block, step] = got
    keys = list(draws)  # another block, step or seed: other noise
    assert all(not torch.equal(draws[a], draws[b]) for i, a in enumerate(keys) for b in keys[i + 1:])
