"""Long, switching runs: prompt switches compile nothing, and memory stays bounded over endless videos."""
import pytest
import torch

from conftest import TINY
from cascade_core.sampler import CascadeConfig, PromptSchedule, generate

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame


def prompts(n):
    g = torch.Generator().manual_seed(40)
    return [torch.randn(3 + 2 * i, TINY.text_dim, generator=g) for i in range(n)]


def test_prompt_switches_compile_no_new_graph(model):
    """Warm up at P5 with one prompt, then three switches at P5: every region is already compiled."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.compile_layers(backend=counting_backend)
    cfg = CascadeConfig(frames_per_block=1, parallel=5)
    run = dict(blocks=8, width=W, height=H, seed=5)
    try:
        a, b, c, d = prompts(4)
        generate(model, PromptSchedule.single(a), cfg, **run)
        warm = len(graphs)
        assert 0 < warm <= 2 * 5  # two regions, one graph per segment count 1..5
        graphs.clear()
        switched = generate(model, PromptSchedule([(0, a), (2, b), (4, c), (6, d)]), cfg, **run)
    finally:
        model.compile_layers(False)
        torch._dynamo.reset()
    assert graphs == [], f"{len(graphs)} new graphs compiled after a prompt switch"
    eager = generate(model, PromptSchedule([(0, a), (2, b), (4, c), (6, d)]), cfg, **run)
    assert (switched.latents - eager.latents).abs().max() <= 1e-5


def test_each_prompt_is_encoded_once_per_run(model):
    """The text K/V of each prompt are computed once, not per block, tick or segment."""
    calls = []
    real = model.encode_prompt

    def counting(embeds):
        calls.append(embeds)
        return real(embeds)

    model.encode_prompt = counting
    try:
        a, b, c, d = prompts(4)
        generate(model, PromptSchedule([(0, a), (2, b), (4, c), (6, d)]), CascadeConfig(frames_per_block=1, parallel=5),
                 blocks=8, width=W, height=H, seed=5)
    finally:
        del model.encode_prompt
    assert [id(e) for e in calls] == [id(e) for e in (a, b, c, d)]
