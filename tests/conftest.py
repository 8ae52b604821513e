"""Test setup: the repository root and every test folder are importable (``import cascade_core`` works from a
clone), and the
tiny random model of the real architecture that the engine tests share.

Fixtures: ``model`` (WanModel.random(TINY, seed 0), fp32), ``prompt`` (a seeded [5, text_dim]
embedding) and ``one_thread`` (torch on one CPU thread for a module); ``TINY`` itself is importable
as ``from conftest import TINY``, and so is ``tiny_models()``, scripts/make_tiny_models.py as a module.
"""
import importlib.util
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The test folders mirror cascade_core's sub-packages; a test module may take helpers of another folder's
# by module name (``from test_vae_encode import ...``), so every folder is importable (basenames are
# unique across folders: tests/architecture checks it).
FOLDERS = sorted(e.path for e in os.scandir(TESTS) if e.is_dir() and any(f.startswith("test_") for f in os.listdir(e.path)))
sys.path[len(sys.path):] = [f for f in FOLDERS if f not in sys.path]

from cascade_core.model.dit import WanConfig, WanModel  # noqa: E402

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)
TINY_5B = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, in_dim=48, out_dim=48)  # Wan2.2 latents


def tiny_models():
    """scripts/make_tiny_models.py loaded as a module (the tiny model files that tests and users write)."""
    spec = importlib.util.spec_from_file_location("make_tiny_models", os.path.join(ROOT, "scripts", "make_tiny_models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def counted(model, run):
    """(result of run(), forwards the model actually ran)."""
    calls = {"n": 0}
    real = model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    model.forward = counting
    try:
        return run(), calls["n"]
    finally:
        del model.forward


@pytest.fixture(scope="module")
def model():
    return WanModel.random(TINY, seed=0)


@pytest.fixture(scope="module")
def prompt():
    return torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def experts():
    """A tiny two-expert model (the high- and the low-noise expert of causal Wan2.2-A14B): two random TINY DiTs."""
    return WanModel.random(TINY, seed=0), WanModel.random(TINY, seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module: the thread count changes the rounding of larger matrix products
    (comparisons with one-thread worker processes need the same), and small convolutions run no
    faster on more threads but far slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def attention_backend_back_to_auto():
    """A run (a node, the CLI) sets the process's attention backend for what follows; every test starts
    and ends on torch's own dispatch, so no test depends on the order the suite runs in."""
    from cascade_core.model import attention

    attention.set_backend("auto")
    yield
    attention.set_backend("auto")
