"""The compile choice: auto compiles where torch.compile can build kernels and says why not elsewhere; torch's
compile caches go to a folder that outlives the process."""
import importlib.util
import os

import pytest
import torch

from cascade_core.model import compiling


def test_auto_compiles_on_cuda_with_triton(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert compiling.resolve_compile("auto", torch.device("cuda:0")) == (True, None)


def test_auto_falls_back_with_one_line_where_triton_is_missing(monkeypatch):
    """A Windows install without Triton: off, and the line says what to install."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    on, why = compiling.resolve_compile("auto", torch.device("cuda:0"))
    assert not on and "\n" not in why and "pip install triton" in why and "triton-windows" in why


@pytest.mark.parametrize("choice, device, want", [("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda:0", False)])
def test_explicit_choices_and_the_cpu(choice, device, want):
    on, why = compiling.resolve_compile(choice, torch.device(device))
    assert on == want and (why is None) == (choice != "auto")


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        compiling.resolve_compile("fast", torch.device("cpu"))


def test_the_disk_cache_folder_is_set_once_and_a_users_own_is_kept(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = str(tmp_path / "cache")
    assert compiling.use_disk_cache(folder) == folder and os.path.isdir(folder)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    assert compiling.use_disk_cache(str(tmp_path / "other")) == folder  # set already: kept
    assert not os.path.exists(tmp_path / "other")
