"""Two-expert (Wan2.2 A14B) folders as weights.expert_files reads them: a model_index.json that is no JSON object,
or a boundary_ratio whose timestep rounds out of 1..999, is refused at the folder in one line naming the file; the
pair folder around a file inside transformer/ or transformer_2/ is found by one rule (pair_folder_of), and such a
file loaded as one DiT is refused; one shard of a sharded single model names the folder to give."""
import json
import os

import pytest
import torch
from conftest import TINY
from test_experts import write_pipeline

from cascade_core.model.dit import WanModel
from cascade_core.model.experts import ExpertPair
from cascade_core.weights.checkpoint import load_dit
from cascade_core.weights.dit_names import diffusers_name
from cascade_core.weights.expert_files import boundary_timestep, expert_folders, pair_folder_of
from cascade_core.weights.probe import shard_words
from cascade_core.weights.safe_io import CheckpointError, save_safetensors

FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def experts():
    return WanModel.random(TINY, seed=0), WanModel.random(TINY, seed=1)


@pytest.mark.parametrize("text, words", [
    ('{"_class_name": "WanPipeline", "boundary_ratio": 0.9,}', "its model_index.json is not valid JSON"),
    ('[0.9]', "its model_index.json holds a JSON list, not an object"),
    ('\xff\xfe', "its model_index.json is not valid JSON"),
])
def test_a_model_index_that_is_no_json_object_is_refused_naming_it(experts, tmp_path, text, words):
    root = write_pipeline(str(tmp_path / "pair"), experts, None)
    with open(os.path.join(root, "model_index.json"), "w", encoding="latin-1") as f:
        f.write(text)
    with pytest.raises(CheckpointError) as err:
        expert_folders(root)
    assert str(err.value).startswith("pair: " + words) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize("ratio", [0.0004, 0.9996, 0.0005])
def test_a_boundary_ratio_rounding_out_of_1_to_999_is_refused_at_the_folder(experts, tmp_path, ratio):
    root = write_pipeline(str(tmp_path / "pair"), experts, {"boundary_ratio": ratio})
    with pytest.raises(CheckpointError, match=rf"^pair: its model_index.json gives boundary_ratio {ratio}; .* 1\.\.999"):
        expert_folders(root)


@pytest.mark.parametrize("ratio, timestep", [(0.0006, 1), (0.9994, 999), (0.875, 875)])
def test_a_boundary_ratio_inside_gives_the_timestep_the_pair_runs_at(experts, tmp_path, ratio, timestep):
    root = write_pipeline(str(tmp_path / "pair"), experts, {"boundary_ratio": ratio})
    assert expert_folders(root).boundary == boundary_timestep(ratio) == timestep
    assert ExpertPair(*experts, boundary=timestep).boundary == timestep  # the pair takes what the folder gives


def test_a_file_inside_an_experts_folder_finds_its_pair_and_is_no_single_dit(experts, tmp_path):
    root = write_pipeline(str(tmp_path / "pair"), experts, {"boundary_ratio": 0.9})
    high = os.path.join(root, "transformer", FILE)
    shard = os.path.join(root, "transformer_2", "diffusion_pytorch_model-00001-of-00002.safetensors")
    os.rename(os.path.join(root, "transformer_2", FILE), shard)
    assert pair_folder_of(high) == pair_folder_of(shard) == os.path.abspath(root)
    assert pair_folder_of(root) is None and pair_folder_of(os.path.join(root, "transformer")) == os.path.abspath(root)
    with pytest.raises(CheckpointError, match=r"^diffusion_pytorch_model.safetensors: is a file of one expert "
                                              r"\(high-noise\) of a two-expert Wan2.2 A14B model: load the pair"):
        load_dit(high, dtype=torch.float32)
    plain = write_pipeline(str(tmp_path / "plain"), experts[:1], None)  # one transformer: not a pair
    assert pair_folder_of(os.path.join(plain, "transformer", FILE)) is None
    assert load_dit(os.path.join(plain, "transformer", FILE), dtype=torch.float32, num_heads=4)[1].config == TINY


def test_one_shard_of_a_sharded_single_model_names_its_folder(experts, tmp_path):
    folder = tmp_path / "wan"
    folder.mkdir()
    sd = {diffusers_name(k): v for k, v in experts[0].state_dict().items()}
    keys = sorted(sd)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        save_safetensors({k: sd[k] for k in part}, str(folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump({"_class_name": "WanTransformer3DModel", "num_attention_heads": TINY.num_heads}, f)
    shard = str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_dit(shard, dtype=torch.float32)
    assert str(err.value) == (f"diffusion_pytorch_model-00002-of-00002.safetensors: is shard 2 of 2 of a sharded "
                              f"model: give the folder that holds them all, {folder}")
    assert load_dit(str(folder), dtype=torch.float32)[1].config == TINY  # the folder loads whole
    assert shard_words(str(tmp_path / "x-00001-of-00001.safetensors")) is None  # one shard of one: the whole
