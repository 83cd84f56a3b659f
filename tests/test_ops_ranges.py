"""Every scan backend, named explicitly, on the input ranges models produce, against the independent
float64 oracle (tests/_scan_oracle.py) fed the same rounded inputs:

- A = -(1..N) (Mamba's S4D-real init), steps from 1e-4 to 30, so dt * A reaches -480 (far below the
  -87 clamp of the CPU kernel's exp) and decays underflow;
- delta + bias beyond 20 (softplus's linear branch) and below 0;
- L across the CPU kernel's 64-step chunks (63, 64, 65, 129), forward and reverse, with the z gate;
- fp16 / bf16 inputs with tolerances a few times the measured error (rounding of the output).
"""
from __future__ import annotations

import math

import pytest
import torch

from _scan_oracle import oracle_scan, rounded, s4d_real_A
from zoo.ops import compiled, selective_scan

CPU_KERNELS, WHY = compiled.kernels_available("cpu")
BACKENDS = ["reference", pytest.param("compiled", marks=pytest.mark.skipif(not CPU_KERNELS, reason=WHY))]
# measured at L = 65, N = 16 (both backends): fp16 / bf16 max |err| / (|ref| + 1) 4.5e-4 / 3.6e-3 (the
# output's rounding); fp32 max |err| 6.3e-5 = 1.8e-7 x max |ref| (cancellation in states of ~300)
TOL = {torch.float16: (1.5e-3, 1.5e-3), torch.bfloat16: (1e-2, 1e-2)}
TOKEN_WISE = ("u", "delta", "B", "C", "z")


def wide_inputs(batch=2, dim=4, L=65, n=16, groups=2, softplus=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(batch, dim, L, generator=g, dtype=torch.float64)  # noqa: E731
    if softplus:  # raw delta + bias over [-9, 31]: both branches of softplus, the linear one above 20
        delta, bias = uniform(-9.0, 30.0), 0.5 * torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    else:  # the step itself, log-uniform over [1e-4, 30]
        delta, bias = torch.exp(uniform(math.log(1e-4), math.log(30.0))), None
    return dict(u=r(batch, dim, L), delta=delta, A=s4d_real_A(dim, n), B=r(batch, groups, n, L),
                C=r(batch, groups, n, L), D=r(dim), z=r(batch, dim, L), delta_bias=bias)


def as_dtype(x, dtype):
    """Token-wise inputs in ``dtype``, weights in fp32 (as the models feed the scan)."""
    weights = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: None if v is None else v.to(dtype if k in TOKEN_WISE else weights) for k, v in x.items()}


def test_inputs_reach_the_ranges_they_claim():
    x = wide_inputs()
    dtA = x["delta"][..., None, :] * x["A"][None, :, :, None]
    assert dtA.min() < -96 and x["delta"].min() < 2e-4 and x["delta"].max() > 25
    s = wide_inputs(softplus=True)
    raw = s["delta"] + s["delta_bias"][:, None]
    assert raw.max() > 20 and raw.min() < 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softplus", [False, True], ids=["step", "softplus"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_wide_ranges_match_oracle(backend, dtype, softplus, reverse):
    low = as_dtype(wide_inputs(softplus=softplus), dtype)
    out, last = selective_scan(**low, delta_softplus=softplus, reverse=reverse, return_last_state=True,
                               backend=backend)
    fed = {k: None if v is None else rounded(v, v.dtype) for k, v in low.items()}
    ref, ref_last = oracle_scan(**fed, delta_softplus=softplus, reverse=reverse, return_last_state=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    rtol, atol = TOL.get(dtype, (1e-5, 1e-6 * ref.abs().max().item()))
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-5, atol=1e-5)  # the state is fp32 in all cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softplus,reverse", [(False, False), (True, True)])
def test_wide_range_gradients_match_oracle_fp32(backend, softplus, reverse):
    x = as_dtype(wide_inputs(L=70, softplus=softplus, seed=4), torch.float32)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if v is not None}
    out = selective_scan(**leaves, delta_softplus=softplus, reverse=reverse, backend=backend)
    ref_leaves = {k: v.double().requires_grad_(True) for k, v in x.items() if v is not None}
    ref = oracle_scan(**ref_leaves, delta_softplus=softplus, reverse=reverse)
    w = torch.randn_like(ref)
    (out * w.float()).sum().backward()
    (ref * w).sum().backward()
    for k, leaf in leaves.items():
        want = ref_leaves[k].grad
        assert torch.isfinite(leaf.grad).all(), k
        scale = want.abs().max().item() + 1.0
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", [63, 64, 65, 129])
def test_gradcheck_across_chunk_boundaries(backend, L):
    """float64 gradcheck at lengths around the CPU kernel's 64-step chunks, reverse with z,
    A = -(1..N), softplus over both branches."""
    g = torch.Generator().manual_seed(L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dim, n = 2, 3
    inputs = dict(u=r(1, dim, L), delta=r(1, dim, L) * 3, A=s4d_real_A(dim, n), B=r(1, 1, n, L), C=r(1, n, L),
                  D=r(dim), z=r(1, dim, L), delta_bias=torch.tensor([0.5, 21.0], dtype=torch.float64))
    names = list(inputs)
    leaves = [inputs[k].requires_grad_(True) for k in names]
    for reverse in (False, True):
        def fn(*xs):
            out, last = selective_scan(**dict(zip(names, xs)), delta_softplus=True, return_last_state=True,
                                       reverse=reverse, backend=backend)
            return out, last

        # the full Jacobian for the kernel (cheap), a random projection of it for the Python loop
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=backend == "reference")
