"""Block swap: blocks streamed from host memory through two device slots give the resident run's latents
exactly (every count of swapped blocks, fp8 layers too), and detaching leaves nothing on the device."""
import dataclasses

import pytest
import torch
from conftest import TINY

from cascade_core.model.dit import WanModel
from cascade_core.model.fp8 import prepare_weights
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

DEEP = dataclasses.replace(TINY, num_layers=5)
RUN = dict(blocks=4, width=64, height=32, seed=3)


def _latents(model):
    emb = torch.randn(6, DEEP.text_dim, generator=torch.Generator().manual_seed(4))
    return generate(model, PromptSchedule.single(emb), CascadeConfig(parallel=3), **RUN).latents


@pytest.mark.parametrize("swapped", [1, 2, 5])
def test_a_swapped_run_gives_the_resident_latents_exactly(swapped):
    model = WanModel.random(DEEP, 0)
    want = _latents(model)
    model.swap_blocks("cpu", swapped)
    assert model.swap.swapped == swapped and len(model.swap.slots) == min(2, swapped)
    # the slots start empty of any block's weights: only the streamed copies can give these latents
    for slot in model.swap.slots:
        for t in slot.state_dict().values():
            t.zero_()
    assert torch.equal(_latents(model), want)
    model.swap.detach()
    assert model.swap is None and torch.equal(_latents(model), want)


def test_fp8_layers_swap_as_they_are():
    model = WanModel.from_state_dict(prepare_weights(WanModel.random(DEEP, 1).state_dict(), torch.float32,
                                                     "fp8_e4m3fn").sd, num_heads=DEEP.num_heads)
    want = _latents(model)
    model.swap_blocks("cpu", 3)
    assert torch.equal(_latents(model), want)


def test_a_wrong_count_is_refused():
    with pytest.raises(ValueError, match="blocks to swap must lie in 1..5"):
        WanModel.random(DEEP, 0).swap_blocks("cpu", 6)


def test_blocks_stored_unalike_are_refused_and_nothing_stays_moved():
    """A file whose swapped blocks mix storages (an fp8 block beside a wider one) would be read through one
    slot layout: refused in one line, the model left whole on the CPU."""
    sd = WanModel.random(DEEP, 2).state_dict()
    prepared = prepare_weights({k: v for k, v in sd.items() if k.startswith("blocks.4.")}, torch.float32,
                               "fp8_e4m3fn").sd
    model = WanModel.from_state_dict({**sd, **prepared}, num_heads=DEEP.num_heads)
    with pytest.raises(ValueError, match="block swap needs the swapped blocks stored alike"):
        model.swap_blocks("cpu", 3)
    assert model.swap is None and all(t.device.type == "cpu" for t in model.state_dict().values())
    model.swap_blocks("cpu", 1)  # the fp8 block alone: one layout
    assert model.swap.swapped == 1
