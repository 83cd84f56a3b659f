"""The compiled CPU selective-scan op against the per-token oracle, gradcheck, and op plumbing."""
from __future__ import annotations

import random

import pytest
import torch

from _scan_oracle import oracle_scan
from zoo.ops import compiled, selective_scan, selective_scan_bidirectional, selective_scan_naive
from zoo.ops.reference import selective_scan_reference

ok, why = compiled.kernels_available("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"compiled CPU kernels unavailable: {why}")


def make_inputs(batch, dim, L, N, groups, var_b, var_c, with_d, with_z, with_bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = rnd(batch, dim, L).to(dtype)
    delta = (0.5 * rnd(batch, dim, L)).to(dtype)
    A = -(0.5 + torch.rand(dim, N, generator=g, dtype=torch.float64))
    A = A.to(torch.float64 if dtype == torch.float64 else torch.float32)
    B = (rnd(batch, groups, N, L) if var_b else rnd(dim, N)).to(dtype if var_b else A.dtype)
    C = (rnd(batch, groups, N, L) if var_c else rnd(dim, N)).to(dtype if var_c else A.dtype)
    D = rnd(dim).to(A.dtype) if with_d else None
    z = rnd(batch, dim, L).to(dtype) if with_z else None
    bias = (0.3 * rnd(dim)).to(A.dtype) if with_bias else None
    return u, delta, A, B, C, D, z, bias


def random_cases(count, seed):
    """Random shapes and option sets; L = 1, odd L and a chunk boundary (64) are always included."""
    rng = random.Random(seed)
    lengths = [1, 7, 64, 65, 130]
    cases = []
    for i in range(count):
        groups = rng.choice([1, 2, 4])
        dim = groups * rng.choice([1, 3, 4])
        cases.append(dict(
            batch=rng.choice([1, 2, 3]), dim=dim, L=lengths[i % len(lengths)], N=rng.choice([1, 4, 16, 17]),
            groups=groups, var_b=rng.random() < 0.7, var_c=rng.random() < 0.7, with_d=rng.random() < 0.7,
            with_z=rng.random() < 0.5, with_bias=rng.random() < 0.5, softplus=rng.random() < 0.6,
            reverse=rng.random() < 0.4,
        ))
    return cases


def assert_close_scaled(actual, expected, tol, what=""):
    """Elementwise check with a tolerance scaled by the tensor's magnitude (fp32 vs a float64 oracle)."""
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def _naive(u, delta, A, B, C, D, z, bias, softplus, reverse):
    if not reverse:
        return selective_scan_naive(u, delta, A, B, C, D, z, bias, softplus, True)
    fl = lambda t: None if t is None else t.flip(-1)  # noqa: E731
    Bf, Cf = (M.flip(-1) if M.dim() == 4 else M for M in (B, C))
    out, last = selective_scan_naive(fl(u), fl(delta), A, Bf, Cf, D, fl(z), bias, softplus, True)
    return out.flip(-1), last


@pytest.mark.parametrize("case", random_cases(10, seed=1), ids=lambda c: "L{L}-N{N}-G{groups}".format(**c))
def test_forward_and_grads_match_oracle_fp32(case):
    c = dict(case)
    softplus, reverse = c.pop("softplus"), c.pop("reverse")
    inputs = make_inputs(**c, seed=c["L"] * 31 + c["N"])
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    out, last = selective_scan(*leaves, delta_softplus=softplus, return_last_state=True, reverse=reverse,
                               backend="compiled")
    ref_leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in inputs]
    ref_out, ref_last = _naive(*ref_leaves, softplus, reverse)
    assert_close_scaled(out, ref_out, 1e-4, "out")
    assert_close_scaled(last, ref_last, 1e-4, "last state")
    w = torch.randn_like(ref_out)
    wl = torch.randn_like(ref_last)
    ((out * w.float()).sum() + (last * wl.float()).sum()).backward()
    ((ref_out * w).sum() + (ref_last * wl).sum()).backward()
    for name, a, r in zip("u delta A B C D z bias".split(), leaves, ref_leaves):
        if a is None:
            continue
        assert_close_scaled(a.grad, r.grad, 1e-3, f"d{name}")


@pytest.mark.parametrize("case", random_cases(4, seed=7)[:4], ids=lambda c: "L{L}-N{N}-G{groups}".format(**c))
def test_gradcheck_float64(case):
    c = dict(case)
    softplus, reverse = c.pop("softplus"), c.pop("reverse")
    c.update(L=min(c["L"], 9), batch=min(c["batch"], 2), N=min(c["N"], 4))
    inputs = [t.requires_grad_(True) if t is not None else None
              for t in make_inputs(**c, dtype=torch.float64, seed=3)]
    present = [i for i, t in enumerate(inputs) if t is not None]

    def fn(*xs):
        full = list(inputs)
        for i, x in zip(present, xs):
            full[i] = x
        out, last = torch.ops.zoo_scan.scan_fwd(*full, softplus, reverse)
        return out, last

    assert torch.autograd.gradcheck(fn, [inputs[i] for i in present], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_low_precision_inputs_match_oracle_on_the_same_rounded_inputs():
    # what remains is the fp32 accumulation and the output's rounding (measured max |err| / (|ref| + 1):
    # bf16 2.8e-3, fp16 4.2e-4)
    for dtype, tol in ((torch.bfloat16, 8e-3), (torch.float16, 1.5e-3)):
        u, delta, A, B, C, D, z, bias = make_inputs(2, 8, 33, 16, 2, True, True, True, True, True, dtype=dtype)
        out = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="compiled")
        ref = oracle_scan(*(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_long_sequence_last_state():
    # many 64-step chunks in the backward; the last state must equal the oracle's after L steps
    u, delta, A, B, C, D, z, bias = make_inputs(1, 2, 1000, 16, 1, True, True, True, False, True)
    out, last = selective_scan(u, delta, A, B, C, D, None, bias, True, True, backend="compiled")
    ref, ref_last = selective_scan_reference(u, delta, A, B, C, D, None, bias, True, True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


def test_bidirectional_matches_two_reference_scans():
    fwd = make_inputs(2, 6, 19, 16, 1, True, True, True, False, True, seed=1)
    rev = make_inputs(2, 6, 19, 16, 1, True, True, True, False, True, seed=2)
    z = torch.randn(2, 6, 19)
    u, delta, A, B, C, D, _, bias = fwd
    ur, deltar, Ar, Br, Cr, Dr, _, biasr = rev
    out = selective_scan_bidirectional(u, delta, A, B, C, D, bias, ur, deltar, Ar, Br, Cr, Dr, biasr, z=z,
                                       backend="compiled")
    y = selective_scan_reference(u, delta, A, B, C, D, None, bias, True)
    y_rev = selective_scan_reference(ur, deltar, Ar, Br, Cr, Dr, None, biasr, True, reverse=True)
    torch.testing.assert_close(out, 0.5 * (y + y_rev) * torch.nn.functional.silu(z), rtol=1e-4, atol=1e-4)


def test_auto_dispatch_picks_compiled_on_cpu():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 5, 4, 1, True, True, True, True, True)
    selective_scan(u, delta, A, B, C, D, z, bias, True)
    assert zoo_last_backend() == "compiled"


def zoo_last_backend():
    from zoo.ops import last_backend

    return last_backend().name


def test_torch_compile_fullgraph_and_checkpointing():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 12, 16, 1, True, True, True, True, True)
    u.requires_grad_(True)

    def f(u):
        return selective_scan(u, delta, A, B, C, D, z, bias, True, backend="compiled").square().sum()

    compiled_f = torch.compile(f, fullgraph=True, backend="aot_eager")
    g1, = torch.autograd.grad(compiled_f(u), u)
    g2, = torch.autograd.grad(f(u), u)
    torch.testing.assert_close(g1, g2)
    for reentrant in (True, False):
        u.grad = None
        torch.utils.checkpoint.checkpoint(f, u, use_reentrant=reentrant).backward()
        torch.testing.assert_close(u.grad, g2)


def test_export_sees_the_op():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 6, 4, 1, True, True, True, True, True)

    class M(torch.nn.Module):
        def forward(self, u, delta):
            return torch.ops.zoo_scan.scan_fwd(u, delta, A, B, C, D, z, bias, True, False)[0]

    ep = torch.export.export(M(), (u, delta))
    assert any("zoo_scan.scan_fwd" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(u, delta), M()(u, delta))


def test_deterministic_backward():
    inputs = make_inputs(3, 8, 70, 16, 2, True, True, True, True, True)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        selective_scan(*leaves, delta_softplus=True, backend="compiled").sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 6, 4, 2, True, True, True, True, True)
    with pytest.raises(ValueError, match="groups"):
        selective_scan(u, delta, A, B[:, :, :, :], torch.randn(1, 3, 4, 6), backend="compiled")
    with pytest.raises(RuntimeError, match=r"zoo_scan.scan_fwd: delta has shape \(1, 4, 3\)"):
        torch.ops.zoo_scan.scan_fwd(u, delta[..., :3], A, B, C, D, z, bias, True, False)


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    """No compiler: the reference runs, one warning says why, an explicit backend request raises."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import warnings, torch
        from zoo.ops import selective_scan, last_backend
        u = torch.randn(1, 2, 5); A = -torch.rand(2, 3); B = torch.randn(1, 1, 3, 5)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            selective_scan(u, u.abs(), A, B, B)
            selective_scan(u, u.abs(), A, B, B)
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and "no C++ compiler" in msgs[0], msgs
        assert last_backend().name == "reference"
        try:
            selective_scan(u, u.abs(), A, B, B, backend="compiled")
        except RuntimeError as e:
            assert "cannot run" in str(e)
        else:
            raise AssertionError("explicit backend='compiled' must raise")
        print("OK")
    """)
    env = dict(__import__("os").environ, CXX=str(tmp_path / "no-such-compiler"), ZOO_EXT_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_cached_library_loads_without_a_compiler():
    """A library built earlier loads in a process whose C++ compiler is gone: the build flags (and so the
    cache key) must not change when the compiler cannot be asked what it is."""
    import subprocess
    import sys

    assert compiled.kernels_available("cpu")[0]  # built (or found) in this process's cache
    code = "from zoo.ops.compiled import kernels_available; ok, why = kernels_available('cpu'); print(ok, why)"
    env = dict(__import__("os").environ, CXX="/nonexistent/c++")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert res.returncode == 0 and res.stdout.startswith("True"), (res.stdout, res.stderr[-2000:])


@pytest.mark.parametrize("N,groups,var_b", [(1, 2, True), (4, 1, False)])
def test_multi_direction_direct_indexing_matches_gather_path(N, groups, var_b):
    """MSVMamba's multi-direction scan through the indexed CPU kernel (no reordered input copies) vs
    the gather-based reference, forward and gradients, with the state carried across directions."""
    from zoo.ops.multi_direction import (resolve_multi_direction_backend, selective_scan_multi_direction,
                                         unregister_multi_direction_backend)
    from zoo.ops.reference import selective_scan_reference

    compiled.register_direct_multi_direction()
    try:
        assert resolve_multi_direction_backend("cpu").name == compiled.MULTI_DIRECTION_BACKEND_NAME
        _check_multi_direction(N, groups, var_b, selective_scan_multi_direction, selective_scan_reference)
    finally:
        unregister_multi_direction_backend(compiled.MULTI_DIRECTION_BACKEND_NAME)


def _check_multi_direction(N, groups, var_b, selective_scan_multi_direction, selective_scan_reference):
    h, w, batch, dim = 3, 5, 2, 4
    inputs = make_inputs(batch, dim, h * w, N, groups, var_b, True, True, False, True, dtype=torch.float64, seed=9)
    u, delta, A, B, C, D, _, bias = inputs
    orders = ("row_reversed", "col", "col_reversed", "row")
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
    out = selective_scan_multi_direction(*leaves, height=h, width=w, orders=orders,
                                         backend=compiled.MULTI_DIRECTION_BACKEND_NAME)
    ref_leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
    # independent oracle: gather each order, concatenate, one reference scan, put outputs back on pixels
    from zoo.ops.multi_direction import scan_order_index

    perms = [scan_order_index(o, h, w) for o in orders]
    idx = torch.cat(perms)
    ru, rdelta, rA, rB, rC, rD, rbias = ref_leaves
    seq = lambda t: t.index_select(-1, idx)  # noqa: E731
    y = selective_scan_reference(seq(ru), seq(rdelta), rA, seq(rB) if rB.dim() == 4 else rB,
                                 seq(rC), rD, None, rbias, True)
    ref = torch.stack([y[..., k * h * w:(k + 1) * h * w][..., torch.argsort(p)] for k, p in enumerate(perms)], 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for name, a, r in zip("u delta A B C D bias".split(), leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")
