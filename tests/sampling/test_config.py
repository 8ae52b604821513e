"""A run's settings and prompt schedule: their checks, one window rule on every path."""

import pytest
import torch

from cascade_core.model.kv_pool import PoolLayout
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule

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
