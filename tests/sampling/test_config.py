"""A run's settings and prompt schedule: their checks, one window rule on every path."""

import pytest
import torch

from cascade_core.model.dit import WanConfig
from cascade_core.model.kv_pool import PoolLayout
from cascade_core.sampling.config import CascadeConfig, PromptSchedule
from cascade_core.sampling.loop import generate
from cascade_core.sampling.memory import estimate_run_bytes
from cascade_core.sampling.plan import plan_run

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame



def test_prompt_schedule_validation():
    e = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="empty"):
        PromptSchedule([]).validate(3)
    with pytest.raises(ValueError, match="beyond the video"):
        PromptSchedule([(0, e), (3, e)]).validate(3)
    with pytest.raises(ValueError, match="expects 4096"):
        PromptSchedule([(0, torch.zeros(4, 768))]).validate(3, 4096)


# ---- the model's interface --------------------------------------------------------------------


@pytest.mark.parametrize("window, sink, fpb", [(2, 0, 3), (5, 3, 3), (3, 1, 3), (0, 0, 1)])
def test_one_window_check_says_the_same_on_every_path(window, sink, fpb):
    """The pool layout and the run's config refuse a window that cannot hold the sink and a block with
    one and the same message; a window of exactly sink + one block is accepted by both."""
    expected = (f"window must hold the sink and one block: at least sink + one block = {sink + fpb} latent "
                f"frames (sink {sink}, blocks of {fpb}), got {window}")
    with pytest.raises(ValueError) as layout:
        PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=30, window=window, sink=sink)
    with pytest.raises(ValueError) as config:
        CascadeConfig(frames_per_block=fpb, window=window, sink=sink).validate()
    assert str(layout.value) == str(config.value) == expected
    PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=30, window=sink + fpb, sink=sink)
    CascadeConfig(frames_per_block=fpb, window=sink + fpb, sink=sink).validate()


@pytest.mark.parametrize("settings,message", [
    (dict(parallel=2, fold_clean=True), "fold-clean works at parallel 1 only"),
    (dict(parallel=1, attention="bidirectional"), "bidirectional in-flight attention needs parallel 2 or more"),
    (dict(parallel=6), r"parallelism must lie in 1\.\.5"),
])
def test_the_rules_of_blocks_in_flight_hold_for_every_frontend(model, prompt, settings, message):
    """Checked by the config itself (once, by plan_run), so the API and the nodes refuse what the CLI does."""
    cfg = CascadeConfig(**settings)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        generate(model, PromptSchedule.single(prompt), cfg, blocks=2, width=64, height=32)


@pytest.mark.parametrize("settings", [dict(), dict(fold_clean=True), dict(parallel=3), dict(parallel=5, window=8, sink=2),
                                      dict(fold_clean=True, window=6, sink=2), dict(independent_first_frame=True, parallel=2)])
def test_the_memory_estimate_sizes_the_pool_the_run_allocates(settings):
    """One derivation of the KV pool's layout (blocks in flight from the schedule): the estimate's KV cache is the
    pool of plan_run's layout (at P1 with fold-clean two blocks are in flight, not one)."""
    cfg = CascadeConfig(frames_per_block=2, **settings)
    shapes = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)  # 1.3B: a block's K/V 0.86 GB in bf16
    run = plan_run(cfg, blocks=5, width=832, height=480)
    _, what = estimate_run_bytes(run, shapes, torch.bfloat16, 1, 0)
    lay = run.layout
    kv = 2 * shapes.num_layers * lay.capacity_frames * lay.tokens_per_frame * shapes.dim * 2
    assert what.startswith(f"KV cache {kv / 1024 ** 3:.2f} GiB")
    assert lay.max_in_flight == run.schedule.max_in_flight == (2 if cfg.fold_clean else cfg.parallel)


def test_a_run_takes_the_plan_its_caller_made_and_refuses_one_of_another_run(model, prompt):
    """A frontend plans once at its entry and hands the plan on; the loop checks it is this run's plan."""
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    plan = plan_run(cfg, blocks=3, width=W, height=H)
    given = generate(model, PromptSchedule.single(prompt), cfg, blocks=3, width=W, height=H, seed=4, plan=plan)
    planned_here = generate(model, PromptSchedule.single(prompt), cfg, blocks=3, width=W, height=H, seed=4)
    assert torch.equal(given.latents, planned_here.latents)
    for other in (dict(blocks=4), dict(width=2 * W), dict(cfg=CascadeConfig(frames_per_block=2, parallel=3))):
        args = {"cfg": cfg, "blocks": 3, "width": W, "height": H, **other}
        with pytest.raises(ValueError, match="the plan of another run"):
            generate(model, PromptSchedule.single(prompt), args.pop("cfg"), **args, plan=plan)
    with pytest.raises(ValueError, match="planned with 0"):  # a schedule with a switch the plan did not check
        generate(model, PromptSchedule([(0, prompt), (1, prompt)]), cfg, blocks=3, width=W, height=H, plan=plan)


def test_a_familys_bidirectional_attention_is_causal_at_p1_and_asked_for_there_is_refused():
    """Rolling Forcing's family attends bidirectionally among its blocks in flight; with one block in flight
    that is causal attention (nothing else to see), so its family at parallel 1 runs; asked for explicitly at
    parallel 1, bidirectional is refused (it would do nothing)."""
    from cascade_core.sampling.families import family_config

    assert family_config("rolling-forcing").attention == "bidirectional"
    at_p1 = family_config("rolling-forcing", parallel=1)
    assert at_p1.attention == "causal"
    at_p1.validate()
    with pytest.raises(ValueError, match="needs parallel 2 or more"):
        family_config("rolling-forcing", parallel=1, attention="bidirectional").validate()


def test_decoders_run_on_the_last_of_several_devices_or_where_asked():
    """With several local devices the finished blocks are decoded on the last of them (not beside the caller on
    the first); one device or a torchrun rank decodes where it runs; a device asked for wins."""
    from cascade_core.session import RunSession

    cfg, first, last = CascadeConfig(frames_per_block=2, parallel=2), torch.device("cuda", 0), torch.device("cuda", 2)
    pooled = RunSession(cfg, blocks=2, width=W, height=H, devices=[first, torch.device("cuda", 1), last])
    assert pooled.decode_device(first) == last
    assert pooled.decode_device(first, torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert RunSession(cfg, blocks=2, width=W, height=H, devices=[first]).decode_device(first) == first
    ranks = RunSession(cfg, blocks=2, width=W, height=H, devices="torchrun", ranks=3)
    assert ranks.decode_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_a_plan_of_several_devices_is_refused_by_one_process_and_a_session_needs_real_devices(model, prompt):
    from cascade_core.session import RunSession

    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    pooled = plan_run(cfg, blocks=2, width=W, height=H, devices=2)
    with pytest.raises(ValueError, match="the plan of another run"):
        generate(model, PromptSchedule.single(prompt), cfg, blocks=2, width=W, height=H, plan=pooled)
    for devices, ranks in (("cpu", None), ("torchrun", None)):
        with pytest.raises(ValueError, match="a list of devices, or 'torchrun' with its number of ranks"):
            RunSession(cfg, blocks=2, width=W, height=H, devices=devices, ranks=ranks)
    assert RunSession(cfg, blocks=2, width=W, height=H, devices="torchrun", ranks=3).plan.devices == 3
