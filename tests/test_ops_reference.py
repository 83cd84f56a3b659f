"""The pure-PyTorch selective scan against an independent oracle, and the dispatch contract."""
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import zoo.ops as ops
from _scan_oracle import oracle_scan, rounded
from zoo.ops import selective_scan, selective_scan_bidirectional, selective_scan_naive, selective_scan_reference


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Scalar loops straight from the recurrence, in float64 (independent of both implementations)."""
    batch, dim, L = u.shape
    n = A.shape[1]
    out = torch.zeros(batch, dim, L, dtype=torch.float64)
    last = torch.zeros(batch, dim, n, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            h = [0.0] * n
            for t in range(L):
                dt = float(delta[b, d, t]) + (float(delta_bias[d]) if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = math.log1p(math.exp(dt))
                y = 0.0
                for k in range(n):
                    if B.dim() == 2:
                        bk, ck = float(B[d, k]), float(C[d, k])
                    else:
                        g = d // (dim // B.shape[1])
                        bk, ck = float(B[b, g, k, t]), float(C[b, g, k, t])
                    h[k] = math.exp(dt * float(A[d, k])) * h[k] + dt * bk * float(u[b, d, t])
                    y += h[k] * ck
                if D is not None:
                    y += float(D[d]) * float(u[b, d, t])
                if z is not None:
                    zz = float(z[b, d, t])
                    y *= zz / (1.0 + math.exp(-zz))
                out[b, d, t] = y
            last[b, d] = torch.tensor(h, dtype=torch.float64)
    return out, last


def make_inputs(batch=2, dim=4, L=7, n=3, groups=2, variable=True, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta = r(batch, dim, L), r(batch, dim, L) * 0.5
    A = -torch.rand(dim, n, generator=g, dtype=dtype) - 0.2
    if variable:
        B, C = r(batch, groups, n, L), r(batch, groups, n, L)
    else:
        B, C = r(dim, n), r(dim, n)
    D, z, bias = r(dim), r(batch, dim, L), r(dim) * 0.3
    tensors = [u, delta, A, B, C, D, z, bias]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


CASES = [
    # (L, groups, variable B/C, with z, with D, with delta_bias, softplus)
    (7, 2, True, True, True, True, True),
    (1, 1, True, True, True, True, True),
    (9, 4, True, False, False, False, False),
    (5, 1, False, True, True, False, True),
    (6, 1, False, False, True, True, False),
    (40, 2, True, True, False, True, True),
]


@pytest.mark.parametrize("L,groups,variable,use_z,use_D,use_bias,softplus", CASES)
def test_reference_matches_oracle(L, groups, variable, use_z, use_D, use_bias, softplus):
    u, delta, A, B, C, D, z, bias = make_inputs(L=L, groups=groups, variable=variable)
    kw = dict(D=D if use_D else None, z=z if use_z else None, delta_bias=bias if use_bias else None,
              delta_softplus=softplus)
    want, want_last = oracle(u, delta, A, B, C, **kw)
    for fn in (selective_scan_reference, selective_scan_naive):
        got, last = fn(u, delta, A, B, C, return_last_state=True, **kw)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        if not use_z:  # the last state is independent of the gate
            torch.testing.assert_close(last, want_last, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variable", [True, False])
def test_reverse_is_flip_scan_flip(variable):
    u, delta, A, B, C, D, z, bias = make_inputs(L=11, variable=variable)
    flip = lambda t: t.flip(-1) if t.dim() >= 3 else t  # noqa: E731
    want = selective_scan_naive(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), bias, True).flip(-1)
    got = selective_scan(u, delta, A, B, C, D, z, bias, True, reverse=True, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # and the walk from t = L-1 down to 0, each step gated by its own z[t], with no flip at all
    torch.testing.assert_close(got, oracle_scan(u, delta, A, B, C, D, z, bias, True, reverse=True),
                               atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("L,groups,variable,use_z,use_D,use_bias,softplus", CASES[:4])
def test_reference_gradcheck(L, groups, variable, use_z, use_D, use_bias, softplus):
    u, delta, A, B, C, D, z, bias = make_inputs(batch=1, dim=2 * groups, L=L, n=2, groups=groups,
                                                variable=variable, requires_grad=True)

    def fn(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D if use_D else None, z if use_z else None,
                              bias if use_bias else None, softplus, backend="reference")

    assert torch.autograd.gradcheck(fn, (u, delta, A, B, C, D, z, bias))


def test_reference_grads_match_naive():
    # same gradients as the per-token oracle on a longer sequence (autograd through both)
    args = make_inputs(L=33, groups=2, requires_grad=True)
    (selective_scan_reference(*args[:5], args[5], args[6], args[7], True) ** 2).sum().backward()
    got = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    (selective_scan_naive(*args[:5], args[5], args[6], args[7], True) ** 2).sum().backward()
    for a, b in zip(got, [t.grad for t in args]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_return_input_dtype_and_fp32_state(dtype):
    u, delta, A, B, C, D, z, bias = make_inputs(L=16, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    out, last = selective_scan(cast(u), cast(delta), A.float(), cast(B), cast(C), D.float(), cast(z), bias.float(),
                               True, True, backend="reference")
    assert out.dtype == dtype and last.dtype == torch.float32
    # the oracle gets the same rounded inputs: what remains is the fp32 accumulation and the output's
    # rounding (measured max |err| / (|ref| + 1): fp32 1.4e-7, fp16 3e-4, bf16 1.4e-3)
    fed = [rounded(t, dtype) for t in (u, delta, B, C, z)]
    want = oracle_scan(fed[0], fed[1], rounded(A, torch.float32), fed[2], fed[3], rounded(D, torch.float32), fed[4],
                       rounded(bias, torch.float32), True)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_bidirectional_is_sum_of_directions():
    fwd = make_inputs(L=10, seed=1)
    rev = make_inputs(L=10, seed=2)
    z = fwd[6]
    y_f = selective_scan_naive(*fwd[:6], None, fwd[7], True)
    flip = lambda t: t.flip(-1) if t.dim() >= 3 else t  # noqa: E731
    y_r = selective_scan_naive(*(flip(t) for t in rev[:6]), None, rev[7], True).flip(-1)
    want = 0.5 * (y_f + y_r) * F.silu(z)
    got = selective_scan_bidirectional(*fwd[:6], fwd[7], *rev[:6], rev[7], z=z, delta_softplus=True, scale=0.5,
                                       backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_backend_choice_is_observable_and_explicit_requests_are_checked():
    u, delta, A, B, C, *_ = make_inputs()
    selective_scan(u, delta, A, B, C, backend="reference")
    choice = ops.last_backend()
    assert choice.name == "reference" and "requested explicitly" in choice.reason
    assert ops.resolve_backend("cpu").name in ops.available_backends("cpu")
    with pytest.raises(ValueError, match="unknown selective-scan backend 'nope'"):
        selective_scan(u, delta, A, B, C, backend="nope")


def test_reference_on_cuda_warns_once(monkeypatch):
    # the warning path is exercised without a GPU by asking the dispatcher directly
    dispatch = importlib.import_module("zoo.ops.selective_scan")  # the module, not the function

    monkeypatch.setattr(dispatch, "_warned_slow_cuda", False)
    choice = ops.BackendChoice("reference", "no kernel built")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dispatch._warn_if_slow(choice, torch.device("cuda"))
        dispatch._warn_if_slow(choice, torch.device("cuda"))
    assert len(caught) == 1 and "ZOO_BUILD_EXT" in str(caught[0].message)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "u must be a \\(batch, dim, L\\) tensor"),
        (lambda a: a.__setitem__(1, a[1][:, :, :-1]), "delta has shape"),
        (lambda a: a.__setitem__(2, a[2][:-1]), "A must be"),
        (lambda a: a.__setitem__(3, torch.randn(2, 3, 3, 7, dtype=torch.float64)), "3 groups, which must divide"),
        (lambda a: a.__setitem__(4, torch.randn(2, 3, dtype=torch.float64)), "C has shape \\(2, 3\\), expected \\(dim, d_state\\)"),
        (lambda a: a.__setitem__(0, a[0].long()), "accepted: float32"),
        (lambda a: a.__setitem__(1, a[1].long()), "delta has dtype torch.int64; accepted: float32"),
        (lambda a: a.__setitem__(3, a[3].to(torch.int32)), "B has dtype torch.int32; accepted"),
        (lambda a: a.__setitem__(4, a[4].to(torch.complex128)), "C has dtype torch.complex128; .* real-valued"),
        (lambda a: a.__setitem__(0, a[0].to(torch.complex64)), "u has dtype torch.complex64"),
        (lambda a: a.__setitem__(1, a[1].bool()), "delta has dtype torch.bool"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = make_inputs()[:5]
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan(*args)
