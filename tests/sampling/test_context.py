"""What the frontends put before the first generated block (cascade_core.sampling.context)."""
import pytest
import torch

from cascade_core.sampling.config import CascadeConfig
from cascade_core.sampling.context import CONTINUATION, START_IMAGE, context_frames_for, context_of, prefix_config


def test_a_start_image_is_the_independent_first_frame_and_keeps_block_0_steps():
    cfg = CascadeConfig(frames_per_block=3, independent_first_frame=True, first_block_steps=(1000, 750, 500, 250),
                        steps=(1000, 500))
    out, notes = prefix_config(cfg, START_IMAGE)
    assert not out.independent_first_frame and out.first_block_steps == (1000, 750, 500, 250)
    assert len(notes) == 1 and "start image is the independent first frame" in notes[0]


def test_a_continuation_drops_every_block_0_rule():
    cfg = CascadeConfig(frames_per_block=1, independent_first_frame=True, first_block_steps=(1000, 750, 500, 250),
                        steps=(1000, 500))
    out, notes = prefix_config(cfg, CONTINUATION)
    assert not out.independent_first_frame and out.first_block_steps is None
    assert len(notes) == 2


def test_a_plain_config_is_unchanged_without_notes():
    cfg = CascadeConfig()
    for kind in (START_IMAGE, CONTINUATION):
        assert prefix_config(cfg, kind) == (cfg, [])
    with pytest.raises(ValueError, match="unknown prefix kind"):
        prefix_config(cfg, "video")


@pytest.mark.parametrize("window, asked, available, expected", [
    (None, 0, 7, 7),  # every frame without a window
    (12, 0, 21, 12),  # the window
    (12, 0, 5, 5),  # never more than there is
    (12, 4, 21, 4),  # asked for
    (None, 30, 21, 21),
])
def test_context_frames(window, asked, available, expected):
    cfg = CascadeConfig(window=window, sink=0)
    assert context_frames_for(cfg, available, asked) == expected
    latents = torch.arange(available, dtype=torch.float32).view(1, 1, available, 1, 1).expand(1, 16, available, 2, 2)
    kept = context_of(latents, cfg, asked)
    assert kept[0, 0, :, 0, 0].tolist() == list(range(available - expected, available))


def test_context_frames_refuses_bad_values():
    with pytest.raises(ValueError, match="context frames must be >= 0"):
        context_frames_for(CascadeConfig(), 5, -1)
    with pytest.raises(ValueError, match="no latent frames"):
        context_frames_for(CascadeConfig(), 0)
    with pytest.raises(ValueError, match=r"\[1, 16, T, h, w\]"):
        context_of(torch.zeros(16, 3, 2, 2), CascadeConfig())
