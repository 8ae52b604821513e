"""GPU checks (skipped without CUDA): fused log-sum-exp kernels, compiled layers, FlashBlock exact mode,
frames out of a run without synchronising its loop."""
import pytest
import torch

from cascade_core.model import attention
from cascade_core.model.attention_libraries import LIBRARY_KERNELS
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=64)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("backend,pool_layout", [("auto", False), ("cudnn", False), ("flash", False),
                                                 ("efficient", False), ("flash4", False), ("flash4", True),
                                                 ("xformers", False), ("xformers", True)])
def test_fused_lse_merge_matches_sdpa_over_the_union(backend, pool_layout, caplog):
    """Each fused kernel's own log-sum-exp layout is read right (efficient pads it to 32 rows; 4680
    queries are not a multiple of 32; flash4 and xformers take [B, L, H, d], the pool's layout), with
    no silent fall-back to the float32 path. The library kernels run where their packages import."""
    library = LIBRARY_KERNELS.get(backend)
    if library is not None and not library.available():
        pytest.skip(f"{library.install} does not import")
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, 12, 128, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               if pool_layout else torch.randn(1, 12, n, 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for n in (4680, 9360, 9360))
    attention.set_backend(backend)
    try:
        with caplog.at_level("WARNING", logger="block_cascade"):
            merged, lse = attention.merge_attention([attention.attend_lse(q, k[:, :, :4680], v[:, :, :4680]),
                                                     attention.attend_lse(q, k[:, :, 4680:], v[:, :, 4680:])])
    finally:
        attention.set_backend("auto")
    # no fall-back (auto may warn once about a library that is installed but broken, and time the rest)
    assert f"{backend} unavailable" not in caplog.text and "float32 reference path" not in caplog.text
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    scores = (q.float() @ k.float().transpose(-1, -2)) / 128 ** 0.5
    assert rel(merged, ref) < 1e-2
    assert (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-2


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient"])
def test_log_sum_exp_over_no_keys_merges_as_nothing(backend):
    """An empty key set gives zeros and -inf, so merging it changes nothing (torch's kernels answer
    +inf, or finite values, over no keys)."""
    g = torch.Generator("cuda").manual_seed(0)
    q, k = (torch.randn(1, 2, n, 128, generator=g, device="cuda", dtype=torch.bfloat16) for n in (5, 7))
    attention.set_backend(backend)
    try:
        whole = attention.attend_lse(q, k, k)
        merged = attention.merge_attention([whole, attention.attend_lse(q, k[:, :, :0], k[:, :, :0])])
    finally:
        attention.set_backend("auto")
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_layers_match_eager(dtype, tol):
    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=dtype)
    embeds = torch.randn(20, 64)
    run = dict(blocks=3, width=128, height=64, seed=1)
    eager = generate(model, PromptSchedule.single(embeds), CascadeConfig(parallel=3), **run).latents
    model.compile_layers()
    compiled = generate(model, PromptSchedule.single(embeds), CascadeConfig(parallel=3), **run).latents
    assert rel(compiled, eager) < tol


def test_flashblock_exact_equals_off_on_the_gpu():
    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.float32)
    embeds = torch.randn(20, 64)
    run = dict(blocks=3, width=128, height=64, seed=1)
    off = generate(model, PromptSchedule.single(embeds), CascadeConfig(parallel=2), **run).latents
    exact = generate(model, PromptSchedule.single(embeds), CascadeConfig(parallel=2, flashblock="exact"), **run).latents
    assert rel(exact, off) < 1e-4


def test_fp8_scaled_mm_matches_the_reference_product():
    from cascade_core.model.fp8 import Fp8Linear, has_fp8_matmul, quantize_rows
    if not has_fp8_matmul(torch.device("cuda")):
        pytest.skip("no fp8 matrix units")
    lin = torch.nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4680, 1536, device="cuda", dtype=torch.bfloat16)
    f8 = Fp8Linear(lin)
    with torch.no_grad():
        fast = f8(x)
        xq, xs = quantize_rows(x)
        slow = (xq.float() * xs) @ (f8.weight.float() * f8.weight_scale.t()).t() + f8.bias.float()
        exact = lin(x)
    assert rel(fast, slow) < 1e-2
    assert rel(fast, exact) < 5e-2


def test_auto_backend_is_measured_once_per_kind_of_call(monkeypatch):
    """One measurement per (heads, width, dtype, length buckets): 4680 and 6000 keys share one, 32760
    keys get their own; whichever kernel wins (flash4 too, where installed) gives the attention."""
    monkeypatch.setattr(attention, "_measured", {})  # what earlier tests measured does not count
    g = torch.Generator("cuda").manual_seed(1)
    q = torch.randn(1, 12, 4680, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    for keys, new in ((4680, 1), (6000, 0), (32760, 1)):
        k, v = (torch.randn(1, 12, keys, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        before = len(attention.measured_backends())
        out = attention.attend(q, k, v)
        assert len(attention.measured_backends()) == before + new
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        assert rel(out, ref) < 1e-2
    chosen = attention.measured_backends()
    assert any(key.startswith("cuda") and "12x128 bfloat16 q<=8192 k<=32768" in key for key in chosen)


def test_one_gpu_worker_pool_equals_the_in_process_run():
    """The NCCL path end to end on one GPU: spawn, weight upload, broadcasts, streaming back."""
    from cascade_core.distributed import WorkerPool

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.float32)
    embeds = torch.randn(20, 64)
    cfg = CascadeConfig(parallel=3)
    run = dict(blocks=3, width=128, height=64, seed=1)
    local = generate(model, PromptSchedule.single(embeds), cfg, **run).latents
    pool = WorkerPool(["cuda:0"])
    try:
        blocks = []
        pooled = pool.generate(model, PromptSchedule.single(embeds), cfg, on_block=lambda e: blocks.append(e.block),
                               **run).latents
    finally:
        pool.close()
    assert blocks == [0, 1, 2]
    assert rel(pooled, local) < 1e-4


def test_prompt_switches_recompile_nothing_with_inductor():
    """The compiled layers (inductor, as users run them) at P5: after a warm-up run with one prompt,
    a run with three prompt switches compiles no new graph (counted by dynamo)."""
    from torch._dynamo.utils import counters

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randn(10 + 7 * i, 64, generator=g) for i in range(4))
    cfg = CascadeConfig(frames_per_block=1, parallel=5)
    run = dict(blocks=8, width=128, height=64, seed=1)
    torch._dynamo.reset()
    model.compile_layers()
    try:
        generate(model, PromptSchedule.single(a), cfg, **run)
        before = dict(counters["stats"])
        generate(model, PromptSchedule([(0, b), (2, c), (4, d), (6, a)]), cfg, **run)
        after = dict(counters["stats"])
    finally:
        model.compile_layers(False)
        torch._dynamo.reset()
    assert before.get("unique_graphs", 0) > 0
    assert after.get("unique_graphs", 0) == before.get("unique_graphs", 0), (before, after)


def test_recache_switches_recompile_nothing_with_inductor():
    """LongLive's re-cache forward (6, then 9 frames: shapes no block has) runs eagerly in compiled
    runs: after a warm-up without switches, a run with three re-cache switches compiles no new graph."""
    from torch._dynamo.utils import counters

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randn(10 + 7 * i, 64, generator=g) for i in range(4))
    cfg = CascadeConfig(window=12, sink=3, switch_mode="recache")
    run = dict(blocks=8, width=128, height=64, seed=1)
    torch._dynamo.reset()
    model.compile_layers()
    try:
        plain = generate(model, PromptSchedule.single(a), cfg, **run)
        before = dict(counters["stats"])
        switched = generate(model, PromptSchedule([(0, b), (2, c), (4, d), (6, a)]), cfg, **run)
        after = dict(counters["stats"])
    finally:
        model.compile_layers(False)
        torch._dynamo.reset()
    assert switched.forwards == plain.forwards + 3
    assert before.get("unique_graphs", 0) > 0
    assert after.get("unique_graphs", 0) == before.get("unique_graphs", 0), (before, after)


def _tiny_vae_on_cuda():
    from cascade_core.video.vae import WanVAEDecoder

    torch.manual_seed(0)
    return WanVAEDecoder.from_state_dict(WanVAEDecoder(dim=8).state_dict(), dtype=torch.float16, device="cuda")


def test_frames_leave_the_gpu_without_stalling_the_tick_loop():
    """Decoded frames reach the host through pinned buffers and events that only the FrameStream's
    writer thread waits for; the latents go to the VAE's stream by an event, and the engine's own
    uploads (timesteps, prompt, RoPE tables) are queued too. Under CUDA's sync debug mode "error"
    (a .cpu(), .item(), .tolist() or blocking copy raises) the whole run with a decoder attached,
    first calls included, raises nothing; the frames are those of a plain decode of its latents."""
    import threading

    from cascade_core.video.frames import FrameStream

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.bfloat16)
    decoder = _tiny_vae_on_cuda()
    embeds = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))  # in host memory, as users have it
    seen = []  # (block, first frame, frames, thread)
    before = set(threading.enumerate())
    frames = FrameStream(decoder, on_frames=lambda e: seen.append((e.block, e.first_frame, e.frames,
                                                                   threading.get_ident())))
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = generate(model, PromptSchedule.single(embeds), CascadeConfig(parallel=2), blocks=3, width=128,
                          height=64, seed=1, on_block=frames.push, on_tick=frames.poll)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    video = frames.finish()
    assert [(b, f, x.shape[2]) for b, f, x, _ in seen] == [(0, 0, 9), (1, 9, 12), (2, 21, 12)]
    assert all(x.device.type == "cpu" and x.is_pinned() for _, _, x, _ in seen)
    assert threading.get_ident() not in {t for *_, t in seen}
    assert set(threading.enumerate()) == before
    plain = decoder.decode(result.latents, frames_per_pass=None).cpu()  # [1, 3, 33, 64, 128]
    assert video.shape == plain.shape and (video - plain).abs().max() < 0.05


def test_vae_uploads_host_latents_without_stalling_the_host():
    """Latents in host memory go to the VAE's stream through a pinned buffer (the caller may change
    them at once); the frames come back to pinned host memory after an event."""
    decoder = _tiny_vae_on_cuda()
    z = torch.randn(1, 16, 3, 8, 16, generator=torch.Generator().manual_seed(3))
    given = z.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        handle = decoder.stream(None).decode_async(z, to_host=True)
        z.zero_()  # the upload was staged: the decode still sees the values given
    finally:
        torch.cuda.set_sync_debug_mode(0)
    frames = handle.result()
    assert frames.device.type == "cpu" and frames.is_pinned() and handle.ready()
    plain = decoder.decode(given.cuda(), frames_per_pass=None).cpu()
    assert frames.shape == plain.shape == (1, 3, 9, 64, 128) and (frames - plain).abs().max() < 0.05


def test_the_decode_stream_runs_ahead_of_the_dit():
    """The decoder's CUDA stream has a higher priority than the default stream the DiT runs on (a lower number),
    so a block's frames are not held back by the next block's queued DiT kernels."""
    stream = _tiny_vae_on_cuda().stream(None)
    assert stream._cuda.priority < torch.cuda.current_stream().priority


@pytest.mark.parametrize("kind,dtype,tol", [("wan", torch.float32, 1e-4), ("krea", torch.float32, 1e-4),
                                             ("wan", torch.float16, 2e-2), ("lighttae", torch.float16, 2e-2)])
def test_decoders_on_the_gpu_stream_the_frames_of_the_cpu(kind, dtype, tol):
    """The channels-last Wan decoder (cuDNN NDHWC kernels, Krea's window too) and LightTAE on the GPU, streamed in
    blocks of 3 and 2 latent frames, give the CPU's float32 frames of the same stream (max abs difference; Krea's
    window depends on where a pass starts, so the CPU streams the same blocks). float32 runs without TF32, which
    cuDNN uses by default (about 2e-3 here); measured on an H100: float32 3e-6 (Wan and Krea), float16 4e-3 (Wan; Krea's
    window 4e-2 at one pixel, mean 5e-4 as the Wan rule's)."""
    from cascade_core.video.taew import LightTAEDecoder
    from cascade_core.video.vae import WanVAEDecoder

    torch.manual_seed(0)
    decoder = LightTAEDecoder((16, 16, 16, 16)) if kind == "lighttae" else WanVAEDecoder(dim=16)
    for p in decoder.parameters():  # frames inside (-1, 1): nothing hidden by the clamp
        p.data.normal_(0, 0.05 if kind == "lighttae" else 0.2)
    if kind == "krea":
        decoder.time_cache = "krea"
    z = torch.randn(1, 16, 5, 12, 20, generator=torch.Generator().manual_seed(1))
    def streamed(model, device):
        stream = model.stream(None)
        return torch.cat([stream.decode(z[:, :, :3].to(device)), stream.decode(z[:, :, 3:].to(device))], 2).cpu()

    cpu = streamed(decoder.eval(), "cpu")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        frames = streamed(decoder.to("cuda", dtype), "cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert frames.shape == cpu.shape and (frames - cpu).abs().max() < tol, (frames - cpu).abs().max()


# ---- two GPUs (NCCL): skipped unless two are present ---------------------------------------------
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs")


@two_gpus
def test_two_gpus_give_the_latents_of_one():
    """fp32: bit-equal at P1 (one segment per tick runs the single-process path); at P>1 equal to fp32
    rounding (each rank's products see fewer segments; remote attention merged by log-sum-exp)."""
    from cascade_core.distributed import WorkerPool

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.float32)
    embeds = torch.randn(20, 64)
    run = dict(blocks=4, width=128, height=64, seed=1)
    pool = WorkerPool(["cuda:0", "cuda:1"])
    try:
        for parallel in (1, 2, 3, 5):
            cfg = CascadeConfig(parallel=parallel)
            local = generate(model, PromptSchedule.single(embeds), cfg, **run).latents
            pooled = pool.generate(model, PromptSchedule.single(embeds), cfg, **run).latents
            if parallel == 1:
                assert torch.equal(pooled, local)
            else:
                assert rel(pooled, local) < 1e-4, parallel
    finally:
        pool.close()


@two_gpus
def test_two_gpus_after_a_context_prefix_give_the_latents_of_one():
    """A context prefix longer than a block (written as blocks on every rank), a window whose sink it
    holds, FlashBlock reuse and a block offset: two GPUs equal one to fp32 rounding."""
    from cascade_core.distributed import WorkerPool

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.float32)
    embeds = torch.randn(20, 64)
    prefix = torch.randn(1, 16, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    cfg = CascadeConfig(parallel=3, window=9, sink=3, flashblock="reuse")
    run = dict(blocks=4, width=128, height=64, seed=1, prefix=prefix, block_offset=2)
    pool = WorkerPool(["cuda:0", "cuda:1"])
    try:
        local = generate(model, PromptSchedule.single(embeds), cfg, **run).latents
        pooled = pool.generate(model, PromptSchedule.single(embeds), cfg, **run).latents
    finally:
        pool.close()
    assert torch.equal(pooled[:, :, :4].cpu(), prefix) and rel(pooled, local) < 1e-4


@two_gpus
@pytest.mark.parametrize("fault,message", [("kill", r"rank 1 \(cuda:1\) died"),
                                           ("oom", r"rank 1 \(cuda:1\) ran out of memory"),
                                           ("interrupt", "stopped at tick")])
def test_two_gpu_faults_behave_as_on_the_cpu(fault, message, monkeypatch):
    """A killed worker or an out-of-memory on one rank: a named error, no process left, the next run
    works; an interrupt: every rank stops at the same tick and the pool stays."""
    import os
    import signal

    from cascade_core.distributed import TEST_FAULT_ENV, WorkerError, WorkerPool
    from cascade_core.sampling.loop import Interrupted

    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.bfloat16)
    embeds = torch.randn(20, 64)
    cfg = CascadeConfig(parallel=2)
    run = dict(blocks=6, width=128, height=64, seed=1)
    pool = WorkerPool(["cuda:0", "cuda:1"], timeout=60)
    try:
        pids = pool.pids
        kw = {}
        if fault == "kill":
            kw["on_tick"] = lambda e: e.tick == 2 and os.kill(pids[1], signal.SIGKILL)
        elif fault == "oom":
            monkeypatch.setenv(TEST_FAULT_ENV, "1:3:oom")
        else:
            kw["should_stop"] = lambda: True
        with pytest.raises(Interrupted if fault == "interrupt" else WorkerError, match=message):
            pool.generate(model, PromptSchedule.single(embeds), cfg, **run, **kw)
        monkeypatch.delenv(TEST_FAULT_ENV, raising=False)
        if fault == "interrupt":
            assert pool.pids == pids and pool.alive
        else:
            import time
            deadline = time.monotonic() + 10
            while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(os.path.exists(f"/proc/{p}") for p in pids)
        res = pool.generate(model, PromptSchedule.single(embeds), cfg, **run)
        assert rel(res.latents, generate(model, PromptSchedule.single(embeds), cfg, **run).latents) < 3e-2
    finally:
        pool.close()


def test_krea_compiled_with_its_reencoder_on_the_gpu_equals_eager_with_it_on_the_cpu():
    """Krea Realtime's KV recompute on the GPU: compiled layers and the re-encoder (decoder and encoder,
    its own CUDA stream) on the GPU, against eager layers and the re-encoder on the CPU (fp32; the same
    seed on one device draws the same noise)."""
    from conftest import tiny_models

    from cascade_core.sampling.families import family_config
    from cascade_core.video.reencode import ContextReencoder

    sd = tiny_models().vae_state_dict("tiny")
    embeds = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.float32)
    run = dict(blocks=4, width=128, height=64, seed=1)
    cfg = family_config("krea-realtime")
    eager = generate(model, PromptSchedule.single(embeds), cfg, **run, context_image=ContextReencoder.from_state_dict(sd))
    model.compile_layers()
    try:
        compiled = generate(model, PromptSchedule.single(embeds), cfg, **run,
                            context_image=ContextReencoder.from_state_dict(sd, device="cuda"))
    finally:
        model.compile_layers(False)
    assert compiled.forwards == eager.forwards == 4 * 5 + 3
    assert rel(compiled.latents, eager.latents) < 1e-3


def test_an_endless_run_holds_flat_gpu_memory_over_120_steered_blocks():
    """Blocks 0 with a window at P3: the memory in use after blocks 60..120 never exceeds what it was after
    blocks 20..60 (KV cache, latent window, prompt table bounded), prompts switched every 5 blocks."""
    model = WanModel.random(SMALL, seed=0, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(12, 64, generator=g) for _ in range(3)]
    allocated, sent = [], [0]

    def steer():
        due = len(allocated) // 5 > sent[0]
        sent[0] += due
        return [(None, prompts[sent[0] % 3])] if due else []

    def on_block(ev):
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())

    res = generate(model, PromptSchedule.single(prompts[0]), CascadeConfig(frames_per_block=1, parallel=3, window=6,
                   sink=2), blocks=0, width=128, height=64, seed=1, on_block=on_block, steer=steer,
                   should_stop=lambda: len(allocated) >= 120)
    assert res.blocks == 120 and sent[0] >= 20
    assert max(allocated[60:]) <= max(allocated[20:60]), (max(allocated[20:60]), max(allocated[60:]))
