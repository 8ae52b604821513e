"""The Wan2.1 DiT module: its configuration read from the weights, tensors shared with the state dict."""
import math

import torch
from conftest import TINY

from cascade_core.model.dit import WanConfig, WanModel

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame



def test_config_is_read_from_weights_and_tensors_are_shared(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = WanModel.from_state_dict(sd, num_heads=4)
    assert loaded.cfg == TINY
    assert loaded.blocks[1].ffn[0].weight.data_ptr() == sd["blocks.1.ffn.0.weight"].data_ptr()
    expected_names = {"patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.bias",
                      "time_projection.1.weight", "blocks.0.self_attn.norm_q.weight",
                      "blocks.1.cross_attn.o.bias", "blocks.0.norm3.weight", "blocks.1.ffn.2.weight",
                      "blocks.0.modulation", "head.head.weight", "head.modulation"}
    assert expected_names <= set(sd)


def test_real_shapes_are_read_from_weights():
    for dim, heads, layers, ffn in ((1536, 12, 30, 8960), (5120, 40, 40, 13824)):
        with torch.device("meta"):
            sd = WanModel(WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers)).state_dict()
        cfg = WanConfig.from_state_dict(sd)
        assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.head_dim) == (dim, heads, layers, ffn, 128)
        assert math.prod(cfg.patch_size) == 4
