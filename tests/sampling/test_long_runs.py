"""Long, switching runs: prompt switches compile nothing, and memory stays bounded over endless videos."""
import pytest
import torch
from conftest import TINY
from oracles import rotate_frames

from cascade_core.model.dit import WanModel, apply_rope
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny products: one thread is fastest on a busy machine
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
        # two regions, each compiled for one segment count, then once for every count (automatic dynamic)
        assert 0 < warm <= 2 * 2, f"{warm} graphs for segment counts 1..5"
        graphs.clear()
        switched = generate(model, PromptSchedule([(0, a), (2, b), (4, c), (6, d)]), cfg, **run)
        fresh = WanModel.from_state_dict(dict(model.state_dict()), num_heads=TINY.num_heads)
        fresh.compile_layers(backend=counting_backend)  # a model built again (a core MODEL's every run)
        again = generate(fresh, PromptSchedule([(0, a), (2, b), (4, c), (6, d)]), cfg, **run)
    finally:
        model.compile_layers(False)
        torch._dynamo.reset()
    assert graphs == [], f"{len(graphs)} new graphs compiled after a prompt switch or for a model built again"
    assert torch.equal(again.latents, switched.latents)
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


# ---- bounded memory over endless videos --------------------------------------------------------

def tensor_bytes(obj):
    """Bytes of every tensor inside nested dicts / tuples / lists / plain objects' attributes."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return sum(tensor_bytes(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0


def test_two_hundred_windowed_blocks_hold_constant_memory(model, prompt):
    """Block after block with a window and a sink: the RoPE tables the model keeps and the KV pool's
    tensors are as large after block 200 as after block 20."""
    from cascade_core.model.kv_pool import KVPool, PoolLayout
    fpb, window, sink, blocks = 1, 4, 1, 200
    layout = PoolLayout(frames_per_block=fpb, tokens_per_frame=4, total_frames=blocks * fpb, window=window, sink=sink)
    pool = KVPool(layout, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    text = model.encode_prompt(prompt)
    g = torch.Generator().manual_seed(8)
    sizes = {}
    with torch.inference_mode():
        for b in range(blocks):
            pool.make_room(b, b)
            x = torch.randn(1, 16, fpb, 4, 4, generator=g)
            model(x, torch.full((1, fpb), 500.0), [b * fpb], [text], pool.attention([b], [(b + 1) * fpb]))
            if b + 1 in (20, blocks):
                sizes[b + 1] = (len(model._rope_cache), tensor_bytes(model._rope_cache), tensor_bytes(pool))
    assert pool.held_frames() == [0, 197, 198, 199]  # the window really rolled
    assert sizes[20] == sizes[blocks], sizes


def test_rope_tables_use_absolute_frame_positions(model):
    """Each pair's angle is its axis position times theta^(-2i/d_axis), written out token by token
    (time, height, width groups of c-2(c//3), c//3, c//3 pairs), far into a long video."""
    c = TINY.head_dim // 2
    groups = (c - 2 * (c // 3), c // 3, c // 3)
    starts, frames, h, w = [597, 600], 3, 2, 3
    cos, sin = model.rope(starts, frames, h, w)
    assert cos.shape == sin.shape == (2, frames * h * w, 1, c)
    for i, s in enumerate(starts):
        for token in range(frames * h * w):
            position = (s + token // (h * w), token // w % h, token % w)
            angles = [p * 10000.0 ** (-2 * j / (2 * n)) for p, n in zip(position, groups) for j in range(n)]
            assert torch.allclose(cos[i, token, 0].double(), torch.tensor(angles, dtype=torch.float64).cos(), atol=1e-6)
            assert torch.allclose(sin[i, token, 0].double(), torch.tensor(angles, dtype=torch.float64).sin(), atol=1e-6)


def test_shifting_keys_by_frames_equals_rope_at_the_shifted_position(model):
    """WanModel.shift_frames(keys RoPE'd at frame p, d) = the keys RoPE'd at p + d: against the rule
    written out (oracles.rotate_frames: time pairs turn, height/width pairs stay) and against the
    model's own RoPE at p + d (float rounding apart)."""
    x = torch.randn(1, 2 * 2 * 3, TINY.num_heads, TINY.head_dim, generator=torch.Generator().manual_seed(5))
    at = lambda p: apply_rope(x, *model.rope([p], 2, 2, 3))  # noqa: E731  2 frames of 2 x 3 tokens
    for p, d in ((6, -3), (3, -3), (0, 5)):
        shifted = model.shift_frames(at(p)[0], d)
        assert torch.allclose(shifted, rotate_frames(at(p)[0], d), atol=1e-6)
        assert torch.allclose(shifted, at(p + d)[0], atol=1e-5)
        assert (shifted - at(p)[0]).abs().max() > 0.1  # it did turn
