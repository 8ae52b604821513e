"""The streaming Wan2.1 VAE encoder of video-to-video (:class:`cascade_core.video.vae_encode.StreamEncoder`) against
diffusers' own whole-video encode (the oracle) on the tiny VAE."""
import pytest
import torch
from conftest import tiny_models
from test_vae_encode import diffusers_vae

from cascade_core.video.vae_encode import StreamEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 64, 32


def test_the_stream_encoder_equals_one_whole_video_encode():
    """Frames 0..4, then 4 at a time, the causal cache kept: diffusers' encode of the whole video (raw mean)."""
    vae = diffusers_vae(tiny_models().vae_state_dict("tiny"))
    pixels = torch.rand(1, 3, 13, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(pixels).latent_dist.mode()
    encoder = StreamEncoder(vae)
    parts = [encoder(pixels[:, :, :5]), encoder(pixels[:, :, 5:9]), encoder(pixels[:, :, 9:13])]
    assert [p.shape[2] for p in parts] == [2, 1, 1]
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=0)
    again = StreamEncoder(vae)(pixels[:, :, :5])  # a new stream starts from an empty cache
    torch.testing.assert_close(again, whole[:, :, :2], atol=1e-5, rtol=0)
