"""The fused Vim mixer on CUDA (zoo_scan::bimamba_conv / bimamba_scan, csrc/mixer_cuda.cu, opt-in
ZOO_CUDA_SCAN=lparallel) against the unfused reference mixer in float64, and its dispatch rules."""
from __future__ import annotations

import copy

import pytest
import torch

from test_mixer_cpu import _mixer, _silence
from zoo.models import vim as vim_mod
from zoo.ops._build import cuda_scan_lparallel
from zoo.ops.compiled import kernels_available
from zoo.ops.mixer import bimamba_rows, fused_mixer_enabled

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# |fused - float64 reference| / |reference| (norms) may reach the larger of TOL and twice the error of the
# unfused pure-PyTorch mixer run in the same dtype (the rounding any path of that dtype pays)
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _reference64(m, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The unfused mixer (conv, scan and gate per direction, pure PyTorch) in float64 on CPU."""
    m64 = copy.deepcopy(m).to("cpu", torch.float64)
    with monkeypatch.context() as mp, torch.no_grad():
        mp.setenv("ZOO_SCAN_BACKEND", "reference")
        return m64(x.to("cpu", torch.float64))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def _assert_close_to_reference(m, x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor, monkeypatch) -> None:
    with monkeypatch.context() as mp, torch.no_grad():
        mp.setenv("ZOO_SCAN_BACKEND", "reference")
        same_dtype = m(x)  # the unfused path on the same device, in the same dtype / autocast state
    err, ref_err = _rel_err(out, ref), _rel_err(same_dtype, ref)
    assert err < max(TOL[out.dtype], 2 * ref_err), (err, ref_err)


@pytest.fixture
def lparallel(monkeypatch):
    monkeypatch.setenv("ZOO_CUDA_SCAN", "lparallel")


def test_switch_parses_like_the_kernels(monkeypatch):
    for value, on in ((None, False), ("", False), ("default", False), ("lparallel", True)):
        if value is None:
            monkeypatch.delenv("ZOO_CUDA_SCAN", raising=False)
        else:
            monkeypatch.setenv("ZOO_CUDA_SCAN", value)
        assert cuda_scan_lparallel() is on
    monkeypatch.setenv("ZOO_CUDA_SCAN", "Lparallel")
    with pytest.raises(ValueError, match="ZOO_CUDA_SCAN must be unset, 'default' or 'lparallel'"):
        cuda_scan_lparallel()


def test_cpu_dispatch_ignores_the_cuda_switch(monkeypatch):
    x = torch.randn(1, 5, 8)
    for value in ("default", "lparallel"):
        monkeypatch.setenv("ZOO_CUDA_SCAN", value)
        with torch.no_grad():
            assert fused_mixer_enabled(x) is kernels_available("cpu")[0]
            assert not fused_mixer_enabled(x.half())  # CPU stays float32-only


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["both", "forward", "reverse"])
@pytest.mark.parametrize("L,d_state,dt_bias", [(7, 16, (-4.0, 1.0)), (197, 16, (-5.0, 0.5)), (1, 8, (-4.0, 1.0))])
def test_cuda_fused_mixer_matches_reference(L, d_state, dt_bias, which, dtype, lparallel, monkeypatch):
    m = _mixer(32, d_state, dt_bias)
    if which == "forward":
        _silence(m.bwd)
    elif which == "reverse":
        _silence(m.fwd)
    m = m.to("cuda", dtype)
    x = torch.randn(3, L, 32, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    ref = _reference64(m, x, monkeypatch)
    assert ref.abs().max() > 1e-2  # the checked direction(s) do reach the output
    calls = []
    monkeypatch.setattr(vim_mod, "bimamba_rows", lambda *a: calls.append(1) or bimamba_rows(*a))
    with torch.no_grad():
        assert fused_mixer_enabled(m.in_proj(x))
        out = m(x)
    assert calls, "the module did not take the fused path"
    assert out.dtype == dtype and out.shape == x.shape
    _assert_close_to_reference(m, x, out, ref, monkeypatch)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_fused_mixer_under_autocast(dtype, lparallel, monkeypatch):
    """An fp32 model under autocast: the in-projection hands fp16/bf16 activations to the fused ops."""
    m = _mixer(32, 16, (-4.0, 1.0)).cuda()
    x = torch.randn(2, 65, 32, generator=torch.Generator().manual_seed(4)).cuda()
    ref = _reference64(m, x, monkeypatch)
    with torch.autocast("cuda", dtype=dtype):
        with torch.no_grad():
            assert fused_mixer_enabled(m.in_proj(x))
            out = m(x)
        assert out.dtype == dtype
        _assert_close_to_reference(m, x, out, ref, monkeypatch)


@cuda
@pytest.mark.cuda
def test_cuda_dispatch_is_opt_in_and_inference_only(monkeypatch):
    xz = torch.randn(1, 5, 16, device="cuda")
    with torch.no_grad():
        for value in (None, "", "default"):
            if value is None:
                monkeypatch.delenv("ZOO_CUDA_SCAN", raising=False)
            else:
                monkeypatch.setenv("ZOO_CUDA_SCAN", value)
            assert not fused_mixer_enabled(xz)  # default behaviour: the unfused path
        monkeypatch.setenv("ZOO_CUDA_SCAN", "lparallel")
        assert fused_mixer_enabled(xz) and fused_mixer_enabled(xz.half())
        assert not fused_mixer_enabled(xz.double())
        monkeypatch.setenv("ZOO_SCAN_BACKEND", "reference")
        assert not fused_mixer_enabled(xz)
    monkeypatch.delenv("ZOO_SCAN_BACKEND")
    assert not fused_mixer_enabled(xz)  # gradients on: training keeps the differentiable path
    m = _mixer(32, 16, (-4.0, 1.0)).cuda()
    m(torch.randn(2, 9, 32, device="cuda")).sum().backward()
    assert m.fwd.A_log.grad is not None and m.bwd.A_log.grad is not None


@cuda
@pytest.mark.cuda
def test_cuda_ops_reject_mixed_dtypes():
    x = torch.randn(1, 5, 8, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="weight must be a float32 tensor on cuda"):
        torch.ops.zoo_scan.bimamba_conv(x, torch.randn(2, 8, 4, device="cuda").half(), torch.randn(2, 8, device="cuda"))
    u = torch.randn(2, 1, 5, 8, device="cuda", dtype=torch.float16)
    B = torch.randn(2, 1, 5, 4, device="cuda")  # float32 next to fp16 activations
    with pytest.raises(RuntimeError, match="B must have the activations' dtype"):
        torch.ops.zoo_scan.bimamba_scan(u, u, -torch.ones(2, 8, 4, device="cuda"), B, B.half(),
                                        torch.ones(2, 8, device="cuda"), torch.zeros(2, 8, device="cuda"), u[0],
                                        True, 0.5)


@cuda
@pytest.mark.cuda
def test_cuda_scan_takes_dt_proj_folded_in(monkeypatch):
    """The schema's dt_weight (which the CPU kernel applies per step) on CUDA: the same result as the
    full-width delta, so a caller may pass either on both devices."""
    monkeypatch.setenv("ZOO_CUDA_SCAN", "lparallel")
    g = torch.Generator().manual_seed(7)
    batch, L, dim, N, R = 2, 33, 24, 8, 4
    u, z = torch.randn(2, batch, L, dim, generator=g), torch.randn(batch, L, dim, generator=g)
    low, dt_w = torch.randn(2, batch, L, R, generator=g), torch.randn(2, dim, R, generator=g) * 0.5
    A, B, C = -torch.rand(2, dim, N, generator=g) * 4, torch.randn(2, batch, L, N, generator=g), torch.randn(
        2, batch, L, N, generator=g)
    D, bias = torch.randn(2, dim, generator=g), torch.randn(2, dim, generator=g) - 2
    args = [t.cuda() for t in (u, low, A, B, C, D, bias, z)]
    folded = torch.ops.zoo_scan.bimamba_scan(*args, True, 0.5, dt_w.cuda())
    args[1] = (low @ dt_w.transpose(1, 2).unsqueeze(1)).cuda()
    full = torch.ops.zoo_scan.bimamba_scan(*args, True, 0.5)
    torch.testing.assert_close(folded, full, atol=1e-5, rtol=1e-5)
