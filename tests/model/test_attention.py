"""The optional library backends, FlashAttention-4 ("flash4") and xformers: their layout glue, and
their refusals where a package or a GPU is missing. The kernels themselves run in tests/device/test_cuda.py
(on a GPU with the packages installed); here stand-ins with each library's interface compute
attention their own way."""
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cascade_core.model import attention, attention_libraries
from cascade_core.model.attention_libraries import LIBRARY_KERNELS

B, HEADS, LQ, LK, D = 2, 3, 5, 7, 16  # all different, so a swapped axis cannot go unseen


def flash_layout_attention(q, k, v, return_lse=False):
    """Stand-in for flash_attn.cute.flash_attn_func: q [B, Lq, H, d], k, v [B, Lk, H, d]."""
    assert q.shape == (B, LQ, HEADS, D) and k.shape[::2] == v.shape[::2] == (B, HEADS)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / D ** 0.5
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)
    return out, (torch.logsumexp(scores, -1).float() if return_lse else None)


def xformers_partial(q, k, v):
    """Stand-in for xformers' memory_efficient_attention_partial: its output float32 (its documented
    default), its log-sum-exp with rows of padding past Lq (which its own shape check allows)."""
    out, lse = flash_layout_attention(q, k, v, return_lse=True)
    return out.float(), torch.cat([lse, torch.full_like(lse, 7.0)[..., :3]], -1)


XFORMERS_FMHA = SimpleNamespace(memory_efficient_attention=lambda q, k, v: flash_layout_attention(q, k, v)[0],
                                memory_efficient_attention_partial=xformers_partial)
STAND_INS = {"flash4": flash_layout_attention, "xformers": XFORMERS_FMHA}
INSTALLS = {"flash4": "flash-attn-4", "xformers": "xformers"}


@pytest.fixture(params=list(LIBRARY_KERNELS))
def library(request):
    """Each library backend's name."""
    return request.param


@pytest.fixture
def stand_in(monkeypatch, library):
    monkeypatch.setattr(LIBRARY_KERNELS[library], "loaded", STAND_INS[library])
    return library


@pytest.fixture
def not_installed(monkeypatch, library):
    monkeypatch.setattr(LIBRARY_KERNELS[library], "loaded", False)
    monkeypatch.setattr(LIBRARY_KERNELS[library], "broken", None)
    return library


def qkv(pool_layout: bool, dtype=torch.float32):
    """q [B, H, Lq, d], k, v [B, H, Lk, d]: views of [B, L, H, d] storage (the KV pool's and the
    model's layout) or contiguous in [B, H, L, d]."""
    g = torch.Generator().manual_seed(0)
    if pool_layout:
        return [torch.randn(B, n, HEADS, D, generator=g, dtype=dtype).transpose(1, 2) for n in (LQ, LK, LK)]
    return [torch.randn(B, HEADS, n, D, generator=g, dtype=dtype) for n in (LQ, LK, LK)]


@pytest.mark.parametrize("pool_layout", [True, False])
def test_a_library_kernel_gives_attention_in_the_engines_layout(stand_in, pool_layout, caplog):
    q, k, v = qkv(pool_layout, torch.bfloat16)
    attention.set_backend(stand_in)
    out = attention.attend(q, k, v)
    with caplog.at_level("WARNING", logger="block_cascade"):
        out_lse, lse = attention._lse_cuda(q, k, v)  # the log-sum-exp path, as on a GPU
    assert "unavailable" not in caplog.text  # no fall-back to the float32 path
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    scores = (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5
    assert out.shape == out_lse.shape == (B, HEADS, LQ, D) and lse.shape == (B, HEADS, LQ)
    assert out.dtype == out_lse.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 outputs
    torch.testing.assert_close(out_lse.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-6)


def test_a_library_kernels_pieces_merge_into_attention_over_the_union(stand_in, caplog):
    """The FlashBlock path: pieces over disjoint keys from a library kernel, merged by their log-sum-exps."""
    q, k, v = qkv(True)
    attention.set_backend(stand_in)
    with caplog.at_level("WARNING", logger="block_cascade"):
        merged, _ = attention.merge_attention([attention._lse_cuda(q, k[:, :, :3], v[:, :, :3]),
                                               attention._lse_cuda(q, k[:, :, 3:], v[:, :, 3:])])
    assert "unavailable" not in caplog.text
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(merged.double(), ref, rtol=1e-5, atol=1e-6)


def test_a_library_backend_without_its_package_is_refused_in_one_line(not_installed):
    hint = f"pip install {INSTALLS[not_installed]}"
    with pytest.raises(ValueError, match=hint):
        attention.set_backend(not_installed)
    assert attention.get_backend() == "auto"
    why = attention.refusal(not_installed, torch.device("cuda"), torch.bfloat16)  # a GPU it could run on
    assert hint in why and "\n" not in why


@pytest.mark.parametrize("installed", [True, False])
def test_a_library_backend_off_the_gpu_is_refused_without_the_install_hint(monkeypatch, library, installed):
    """On the CPU, or in float32, installing the package would not help: the refusal says why."""
    monkeypatch.setattr(LIBRARY_KERNELS[library], "loaded", STAND_INS[library] if installed else False)
    for device, dtype in ((torch.device("cpu"), torch.bfloat16), (torch.device("cuda"), torch.float32)):
        why = attention.refusal(library, device, dtype)
        assert "runs only on NVIDIA" in why and "run on a CUDA GPU" in why and "pip install" not in why
        assert "\n" not in why


def test_auto_always_runs_and_unknown_names_are_refused():
    assert attention.refusal("auto", torch.device("cpu"), torch.float32) is None
    assert "unknown attention backend" in attention.refusal("fa9", torch.device("cpu"), torch.float32)


def test_lengths_in_one_bucket_share_a_measurement():
    assert [attention._bucket(n) for n in (1, 2, 3, 512, 4680, 8192, 8193, 32760)] == \
        [1, 2, 4, 512, 8192, 8192, 16384, 32768]


class CompilerError(Exception):
    """Like the CuTe DSL's own errors: not a RuntimeError."""


@pytest.mark.parametrize("error", [CompilerError("kernel failed to compile"), RuntimeError(), TypeError("api")])
def test_a_failing_library_call_falls_back_with_one_warning(monkeypatch, caplog, library, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(LIBRARY_KERNELS[library], "loaded", SimpleNamespace(
        memory_efficient_attention=failing, memory_efficient_attention_partial=failing) if library == "xformers"
        else failing)
    monkeypatch.setattr(attention, "_warned", set())  # warnings are once per process and kind of call
    attention.set_backend(library)
    q, k, v = qkv(True)
    with caplog.at_level("WARNING", logger="block_cascade"):
        out, lse = attention._lse_cuda(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert caplog.text.count(f"{library} unavailable") == 1
    assert (str(error) or type(error).__name__) in caplog.text


def untried(monkeypatch, library):
    """The kernel as before its first import, with its package's modules forgotten."""
    kernel = LIBRARY_KERNELS[library]
    monkeypatch.setattr(kernel, "loaded", None)
    monkeypatch.setattr(kernel, "broken", None)
    parts = kernel.module.split(".")
    for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return kernel


@pytest.mark.parametrize("failure, reason", [("raise OSError()", "OSError"),
                                             ("import a_dependency_that_is_missing", "No module named")])
def test_a_broken_install_is_named_as_such(monkeypatch, tmp_path, library, failure, reason):
    """The package present but failing to import (its CUDA libraries, a dependency of its own):
    refused as broken, with the reason, not as missing."""
    kernel = untried(monkeypatch, library)
    folder = tmp_path
    for part in kernel.module.split("."):
        folder = folder / part
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (folder / "__init__.py").write_text(failure + "\n")  # OSError() has no message, as some loaders raise
    installed_distribution(tmp_path, kernel.install)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not kernel.available()
    why = attention.refusal(library, torch.device("cuda"), torch.bfloat16)
    assert why.startswith(f"attention backend {library}: {INSTALLS[library]} is installed but does not import ({reason}")
    assert why.endswith("); use auto") and "pip install" not in why


def installed_distribution(folder, name: str) -> None:
    """Metadata of an installed distribution ``name`` in ``folder`` (what pip leaves beside a package)."""
    info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")


def test_a_missing_package_is_named_as_missing(monkeypatch, library):
    kernel = untried(monkeypatch, library)
    monkeypatch.setitem(sys.modules, kernel.module.split(".")[0], None)  # import fails as for an absent package
    monkeypatch.setattr(attention_libraries, "installed", lambda name: False)
    assert not kernel.available()
    assert f"pip install {INSTALLS[library]}" in attention.refusal(library, torch.device("cuda"), torch.bfloat16)


def test_a_broken_flash_attention_2_is_not_taken_for_a_broken_flash_attn_4(monkeypatch, tmp_path):
    """FlashAttention-2 owns the ``flash_attn`` package too; one that fails to import (built for
    another torch) makes ``flash_attn.cute`` fail, but flash-attn-4 is still what is missing."""
    kernel = untried(monkeypatch, "flash4")
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda: undefined symbol')\n")
    installed_distribution(tmp_path, "flash-attn")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(attention_libraries, "installed", lambda name: name == "flash-attn")
    assert not kernel.available()
    assert attention.refusal("flash4", torch.device("cuda"), torch.bfloat16) == \
        "attention backend flash4 needs the flash-attn-4 package (pip install flash-attn-4); use auto"


def test_a_library_log_sum_exp_comes_out_float32(monkeypatch):
    def half_lse(q, k, v, return_lse=False):
        out, lse = flash_layout_attention(q, k, v, return_lse)
        return out, lse.to(torch.bfloat16)

    monkeypatch.setattr(LIBRARY_KERNELS["flash4"], "loaded", half_lse)
    assert LIBRARY_KERNELS["flash4"](*qkv(True), lse=True)[1].dtype == torch.float32


def test_log_sum_exp_over_no_keys_on_any_backend(stand_in, monkeypatch):
    """No kernel is asked about an empty key set (torch's CUDA kernels answer +inf or finite values)."""
    def asked(*args):
        raise AssertionError("a kernel was asked about no keys")

    monkeypatch.setattr(attention, "_lse_cuda", asked)
    monkeypatch.setattr(attention, "_lse_math", asked)
    q, k, v = qkv(True)
    attention.set_backend(stand_in)
    out, lse = attention.attend_lse(q, k[:, :, :0], v[:, :, :0])
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all() and lse.dtype == torch.float32


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


def test_an_exception_without_a_printable_message_still_gives_a_line(monkeypatch, caplog):
    class Unprintable(RuntimeError):
        def __str__(self):
            raise TypeError("no message")

    def failing(*args, **kwargs):
        raise Unprintable()

    monkeypatch.setattr(LIBRARY_KERNELS["flash4"], "loaded", failing)
    monkeypatch.setattr(attention, "_warned", set())
    attention.set_backend("flash4")
    with caplog.at_level("WARNING", logger="block_cascade"):
        out, _ = attention._lse_cuda(*qkv(True))
    assert "flash4 unavailable" in caplog.text and "Unprintable" in caplog.text
