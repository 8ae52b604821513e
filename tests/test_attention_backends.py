"""The optional FlashAttention-4 backend ("flash4"): its layout glue, and its refusals where the
flash-attn-4 package or a GPU is missing. The kernel itself runs in tests/test_cuda.py (on a GPU with
the package installed); here a stand-in with FlashAttention's interface computes attention its own way."""
import sys

import pytest
import torch
import torch.nn.functional as F

from cascade_core import attention

B, HEADS, LQ, LK, D = 2, 3, 5, 7, 16  # all different, so a swapped axis cannot go unseen


def flash_layout_attention(q, k, v, return_lse=False):
    """Stand-in for flash_attn.cute.flash_attn_func: q [B, Lq, H, d], k, v [B, Lk, H, d]."""
    assert q.shape == (B, LQ, HEADS, D) and k.shape[::2] == v.shape[::2] == (B, HEADS)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / D ** 0.5
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)
    return out, (torch.logsumexp(scores, -1).float() if return_lse else None)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(attention, "_flash4_func", flash_layout_attention)


@pytest.fixture
def not_installed(monkeypatch):
    monkeypatch.setattr(attention, "_flash4_func", False)


def qkv(pool_layout: bool):
    """q [B, H, Lq, d], k, v [B, H, Lk, d]: views of [B, L, H, d] storage (the KV pool's and the
    model's layout) or contiguous in [B, H, L, d]."""
    g = torch.Generator().manual_seed(0)
    if pool_layout:
        return [torch.randn(B, n, HEADS, D, generator=g).transpose(1, 2) for n in (LQ, LK, LK)]
    return [torch.randn(B, HEADS, n, D, generator=g) for n in (LQ, LK, LK)]


@pytest.mark.parametrize("pool_layout", [True, False])
def test_flash4_gives_attention_in_the_engines_layout(stand_in, pool_layout, caplog):
    q, k, v = qkv(pool_layout)
    attention.set_backend("flash4")
    out = attention.attend(q, k, v)
    with caplog.at_level("WARNING", logger="block_cascade"):
        out_lse, lse = attention._lse_cuda(q, k, v)  # the log-sum-exp path, as on a GPU
    assert "unavailable" not in caplog.text  # no fall-back to the float32 path
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    scores = (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5
    assert out.shape == out_lse.shape == (B, HEADS, LQ, D) and lse.shape == (B, HEADS, LQ)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_lse.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-6)


def test_flash4_pieces_merge_into_attention_over_the_union(stand_in, caplog):
    """The FlashBlock path: pieces over disjoint keys from flash4, merged by their log-sum-exps."""
    q, k, v = qkv(True)
    attention.set_backend("flash4")
    with caplog.at_level("WARNING", logger="block_cascade"):
        merged, _ = attention.merge_attention([attention._lse_cuda(q, k[:, :, :3], v[:, :, :3]),
                                               attention._lse_cuda(q, k[:, :, 3:], v[:, :, 3:])])
    assert "unavailable" not in caplog.text
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(merged.double(), ref, rtol=1e-5, atol=1e-6)


def test_flash4_without_the_package_is_refused_in_one_line(not_installed):
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        attention.set_backend("flash4")
    assert attention.get_backend() == "auto"
    why = attention.refusal("flash4", torch.device("cuda"), torch.bfloat16)  # a GPU it could run on
    assert "pip install flash-attn-4" in why and "\n" not in why


@pytest.mark.parametrize("installed", [True, False])
def test_flash4_off_the_gpu_is_refused_without_the_install_hint(monkeypatch, installed):
    """On the CPU, or in float32, installing the package would not help: the refusal says why."""
    monkeypatch.setattr(attention, "_flash4_func", flash_layout_attention if installed else False)
    for device, dtype in ((torch.device("cpu"), torch.bfloat16), (torch.device("cuda"), torch.float32)):
        why = attention.refusal("flash4", device, dtype)
        assert "NVIDIA GPUs" in why and "pip install" not in why and "\n" not in why


def test_auto_always_runs_and_unknown_names_are_refused():
    assert attention.refusal("auto", torch.device("cpu"), torch.float32) is None
    assert "unknown attention backend" in attention.refusal("fa9", torch.device("cpu"), torch.float32)


def test_lengths_in_one_bucket_share_a_measurement():
    assert [attention._bucket(n) for n in (1, 2, 3, 512, 4680, 8192, 8193, 32760)] == \
        [1, 2, 4, 512, 8192, 8192, 16384, 32768]


class CompilerError(Exception):
    """Like the CuTe DSL's own errors: not a RuntimeError."""


@pytest.mark.parametrize("error", [CompilerError("kernel failed to compile"), RuntimeError(), TypeError("api")])
def test_a_failing_flash4_call_falls_back_with_one_warning(monkeypatch, caplog, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(attention, "_flash4_func", failing)
    monkeypatch.setattr(attention, "_warned", set())  # warnings are once per process and kind of call
    attention.set_backend("flash4")
    q, k, v = qkv(True)
    with caplog.at_level("WARNING", logger="block_cascade"):
        out, lse = attention._lse_cuda(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert caplog.text.count("flash4 unavailable") == 1
    assert (str(error) or type(error).__name__) in caplog.text


def test_a_broken_install_is_named_as_such(monkeypatch, tmp_path):
    """flash-attn-4 present but failing to import (its CUDA libraries): refused as broken, not missing."""
    package = tmp_path / "flash_attn" / "cute"
    package.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("raise OSError()\n")  # no message, as some loaders raise
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(attention, "_flash4_func", None)
    monkeypatch.setattr(attention, "_flash4_broken", None)
    assert not attention.flash4_available()
    why = attention.refusal("flash4", torch.device("cuda"), torch.bfloat16)
    assert why == "attention backend flash4: flash-attn-4 is installed but does not import (OSError); use auto"


def test_a_missing_package_is_named_as_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as for an absent package
    monkeypatch.setattr(attention, "_flash4_func", None)
    monkeypatch.setattr(attention, "_flash4_broken", None)
    assert not attention.flash4_available()
    assert "pip install flash-attn-4" in attention.refusal("flash4", torch.device("cuda"), torch.bfloat16)


def test_cpu_log_sum_exp_over_no_keys_and_strided_inputs():
    """torch's CPU flash kernel checks neither: an empty key set must give -inf and zeros (it used to
    end the process), a strided last dim the right attention (it used to be silently wrong)."""
    q = torch.randn(2, 3, 4, 8)
    out, lse = attention.attend_lse(q, q[:, :, :0], q[:, :, :0])
    assert (out == 0).all() and torch.isneginf(lse).all()
    x = torch.randn(2, 3, 5, 16)[..., ::2]
    out, lse = attention.attend_lse(x, x, x)
    torch.testing.assert_close(out.double(), F.scaled_dot_product_attention(x.double(), x.double(), x.double()),
                               rtol=1e-5, atol=1e-5)
