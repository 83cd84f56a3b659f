"""CUDA selective-scan kernels: forward/backward vs the reference on random shapes (needs a GPU), and
a compile check of the .cu sources with the local nvcc against the installed torch (runs in CI)."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from zoo.ops import selective_scan, selective_scan_bidirectional
from zoo.ops.reference import selective_scan_reference

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _rel(a, b):
    if a is None or b is None:  # a gradient autograd never produced is zero (e.g. dA when L == 1)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
    return ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()


def _inputs(batch, dim, L, N, groups, dtype, var_b=True, var_c=True, seed=0, softplus=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    # raw delta around -1 goes through softplus; without it delta must already be a positive step
    delta = 0.5 * r(batch, dim, L) - 1 if softplus else 0.3 * r(batch, dim, L).abs()
    return dict(
        u=r(batch, dim, L).to(dtype), delta=delta.to(dtype),
        A=-(torch.rand(dim, N, device="cuda", generator=g) + 0.5),
        B=r(batch, groups, N, L).to(dtype) if var_b else r(dim, N),
        C=r(batch, groups, N, L).to(dtype) if var_c else r(dim, N),
        D=r(dim), z=r(batch, dim, L).to(dtype), bias=0.3 * r(dim) if softplus else 0.1 * r(dim).abs(),
    )


def _cases(count, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        groups = rng.choice([1, 2, 4])
        cases.append(dict(
            batch=rng.choice([1, 2, 3]), dim=groups * rng.choice([3, 8, 64]), L=[1, 7, 64, 197, 1031][i % 5],
            N=rng.choice([1, 16, 16, 4, 23, 64, 256]), groups=groups, dtype=rng.choice(["float32", "bfloat16", "float16"]),
            var_b=rng.random() < 0.8, var_c=rng.random() < 0.8, with_z=rng.random() < 0.6,
            reverse=rng.random() < 0.4, softplus=rng.random() < 0.7,
        ))
    return cases


def _check_against_reference(case, model_range=False):
    dtype = getattr(torch, case["dtype"])
    t = _inputs(case["batch"], case["dim"], case["L"], case["N"], case["groups"], dtype, case["var_b"], case["var_c"],
                seed=case["L"] + case["N"], softplus=case["softplus"])
    if model_range:  # Vim / Mamba's A = -(1..N), and dt spread over 1e-4..30 (after softplus)
        t["A"] = -torch.arange(1, case["N"] + 1, device="cuda", dtype=torch.float32).repeat(case["dim"], 1)
        g = torch.Generator(device="cuda").manual_seed(case["L"])
        dt = torch.exp(torch.empty(t["u"].shape, device="cuda").uniform_(-9.2, 3.4, generator=g))
        t["delta"] = (torch.where(dt > 20, dt, torch.log(torch.expm1(dt))) if case["softplus"] else dt).to(dtype)
        t["bias"] = torch.zeros_like(t["bias"])
    z = t["z"] if case["with_z"] else None
    names = ["u", "delta", "A", "B", "C", "D", "bias"]
    ours = {k: t[k].clone().requires_grad_(True) for k in names}
    ref = {k: t[k].detach().double().requires_grad_(True) for k in names}
    zo = z.clone().requires_grad_(True) if z is not None else None
    zr = z.detach().double().requires_grad_(True) if z is not None else None
    kw = dict(delta_softplus=case["softplus"], return_last_state=True, reverse=case["reverse"])
    out, last = selective_scan(ours["u"], ours["delta"], ours["A"], ours["B"], ours["C"], ours["D"], zo, ours["bias"],
                               backend="compiled", **kw)
    rout, rlast = selective_scan_reference(ref["u"], ref["delta"], ref["A"], ref["B"], ref["C"], ref["D"], zr,
                                           ref["bias"], **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(out, rout) < tol, _rel(out, rout)
    assert _rel(last, rlast) < max(tol, 1e-3)
    w = torch.randn_like(rout)
    (out.float() * w.float()).sum().backward()
    (rout * w).sum().backward()
    gtol = 1e-3 if dtype == torch.float32 else 3e-2
    for k in names:
        assert _rel(ours[k].grad, ref[k].grad) < gtol, (k, _rel(ours[k].grad, ref[k].grad))
    if z is not None:
        assert _rel(zo.grad, zr.grad) < gtol


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", _cases(24, seed=5), ids=lambda c: "L{L}-N{N}-G{groups}-{dtype}".format(**c))
def test_cuda_matches_reference(case):
    _check_against_reference(case)


# ---- the L-parallel kernel (csrc/scan_cuda_lpar.cu), switched on by ZOO_CUDA_SCAN=lparallel ----


@pytest.fixture
def lparallel(monkeypatch):
    monkeypatch.setenv("ZOO_CUDA_SCAN", "lparallel")


def _lpar_cases():
    """Every L and d_state of the issue's list (long L with few rows, so the two-pass scheme runs;
    L 49 / 100 for the rows that share a warp),
    groups, all three dtypes, reverse, fixed/variable B and C, with and without z / softplus."""
    rng = random.Random(11)
    grid = [(L, N) for L in (1, 7, 197, 2048, 2049) for N in (1, 4, 16, 64, 256)]
    grid += [(49, 1), (100, 1), (100, 16)]  # rows of 8 / 16 lanes sharing a warp
    grid += [(6085, 4), (6085, 16), (6085, 64), (65536, 1), (65536, 16)]
    cases = []
    for i, (L, N) in enumerate(grid):
        groups = [1, 2, 4][i % 3]
        long = L > 4096
        cases.append(dict(
            batch=1 if long else rng.choice([1, 2]), dim=groups * (rng.choice([2, 3]) if long else rng.choice([3, 8, 32])),
            L=L, N=N, groups=groups, dtype=["float32", "bfloat16", "float16"][i % 3],
            var_b=i % 7 != 3, var_c=i % 5 != 2, with_z=i % 4 != 1, reverse=i % 2 == 1, softplus=i % 6 != 5,
        ))
    return cases


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", _lpar_cases(), ids=lambda c: "L{L}-N{N}-G{groups}-{dtype}-rev{reverse:d}".format(**c))
def test_lparallel_matches_reference(case, lparallel):
    _check_against_reference(case, model_range=True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_lparallel_agrees_with_default_kernel_and_is_deterministic(monkeypatch):
    t = _inputs(3, 96, 3000, 16, 2, torch.bfloat16, seed=7)
    names = ["u", "delta", "A", "B", "C", "D", "z", "bias"]
    runs = []
    for switch in ("default", "lparallel", "lparallel"):
        monkeypatch.setenv("ZOO_CUDA_SCAN", switch)
        leaves = [t[k].clone().requires_grad_(True) for k in names]
        out = selective_scan(*leaves[:6], leaves[6], leaves[7], True, backend="compiled", reverse=True)
        out.float().square().sum().backward()
        runs.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b)  # bit-identical: no atomics
    for a, b in zip(runs[0], runs[1]):
        assert _rel(b, a) < 2e-2


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_lparallel_switch_rejects_unknown_value(monkeypatch):
    t = _inputs(1, 4, 8, 4, 1, torch.float32)
    monkeypatch.setenv("ZOO_CUDA_SCAN", "fastest")
    with pytest.raises(RuntimeError, match="ZOO_CUDA_SCAN must be unset, 'default' or 'lparallel'"):
        torch.ops.zoo_scan.scan_fwd(t["u"], t["delta"], t["A"], t["B"], t["C"], None, None, None, True, False)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("switch", ["default", "lparallel"])
def test_cuda_bidirectional_fused_matches_reference(dtype, switch, monkeypatch):
    monkeypatch.setenv("ZOO_CUDA_SCAN", switch)
    f, r = _inputs(2, 64, 197, 16, 1, dtype, seed=1), _inputs(2, 64, 197, 16, 1, dtype, seed=2)
    names = ["u", "delta", "A", "B", "C", "D", "bias"]
    leaves_f = {k: f[k].clone().requires_grad_(True) for k in names}
    leaves_r = {k: r[k].clone().requires_grad_(True) for k in names}
    z = f["z"].clone().requires_grad_(True)
    args = lambda d: [d[k] for k in ("u", "delta", "A", "B", "C", "D", "bias")]  # noqa: E731
    out = selective_scan_bidirectional(*args(leaves_f), *args(leaves_r), z=z, backend="compiled")
    rf = {k: f[k].detach().double().requires_grad_(True) for k in names}
    rr = {k: r[k].detach().double().requires_grad_(True) for k in names}
    zr = f["z"].detach().double().requires_grad_(True)
    y = selective_scan_reference(rf["u"], rf["delta"], rf["A"], rf["B"], rf["C"], rf["D"], None, rf["bias"], True)
    y2 = selective_scan_reference(rr["u"], rr["delta"], rr["A"], rr["B"], rr["C"], rr["D"], None, rr["bias"], True,
                                  reverse=True)
    ref = 0.5 * (y + y2) * torch.nn.functional.silu(zr)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref) < tol
    w = torch.randn_like(ref)
    (out.float() * w.float()).sum().backward()
    (ref * w).sum().backward()
    gtol = 1e-3 if dtype == torch.float32 else 3e-2
    for k in names:
        assert _rel(leaves_f[k].grad, rf[k].grad) < gtol, ("fwd", k)
        assert _rel(leaves_r[k].grad, rr[k].grad) < gtol, ("rev", k)
    assert _rel(z.grad, zr.grad) < gtol


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_three_dim_B_C_match_reference_with_grads(reverse):
    """mamba-ssm's (batch, d_state, L) B/C (one group): same values as the 4-D one-group layout in the
    float64 reference, and the gradient comes back 3-D."""
    t = _inputs(2, 8, 97, 16, 1, torch.float32)
    t["B"], t["C"] = t["B"][:, 0].contiguous(), t["C"][:, 0].contiguous()
    names = ["u", "delta", "A", "B", "C", "D", "z", "bias"]
    ours = {k: t[k].clone().requires_grad_(True) for k in names}
    ref = {k: t[k].detach().double().requires_grad_(True) for k in names}
    out = selective_scan(*(ours[k] for k in names), True, reverse=reverse, backend="compiled")
    rout = selective_scan_reference(ref["u"], ref["delta"], ref["A"], ref["B"][:, None], ref["C"][:, None], ref["D"],
                                    ref["z"], ref["bias"], True, reverse=reverse)
    assert _rel(out, rout) < 1e-4
    w = torch.randn_like(rout)
    (out * w.float()).sum().backward()
    (rout * w).sum().backward()
    for k in names:
        assert ours[k].grad.shape == t[k].shape
        assert _rel(ours[k].grad, ref[k].grad) < 1e-3, k


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_backward_is_deterministic_and_compiles():
    t = _inputs(4, 128, 300, 16, 2, torch.bfloat16)
    names = ["u", "delta", "A", "B", "C", "D", "z", "bias"]
    grads = []
    for _ in range(2):
        leaves = [t[k].clone().requires_grad_(True) for k in names]
        selective_scan(*leaves[:6], leaves[6], leaves[7], True, backend="compiled").float().square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    f = torch.compile(lambda u: selective_scan(u, t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["bias"], True),
                      fullgraph=True)
    assert _rel(f(t["u"]), selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["bias"], True)) < 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_int64_indexing_beyond_2_31():
    # batch * dim * L > 2^31 elements: a 32-bit offset would wrap and corrupt the last channels
    batch, dim, L = 1, (1 << 21) + 64, 1024  # 2^31 + 65536 elements, 4 GiB per bf16 tensor
    if torch.cuda.mem_get_info()[0] < 24 * (1 << 30):
        pytest.skip("needs ~24 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(batch, dim, L, device="cuda", generator=g).to(torch.bfloat16)
    delta = torch.randn(batch, dim, L, device="cuda", generator=g).to(torch.bfloat16)
    A = -torch.rand(dim, 1, device="cuda", generator=g) - 0.5
    B = torch.randn(batch, 1, 1, L, device="cuda", generator=g).to(torch.bfloat16)
    C = torch.randn(batch, 1, 1, L, device="cuda", generator=g).to(torch.bfloat16)
    D = torch.randn(dim, device="cuda", generator=g)
    out = selective_scan(u, delta, A, B, C, D, None, None, True, backend="compiled")
    tail = slice(dim - 3, dim)  # the channels whose offsets lie beyond 2^31
    ref = selective_scan_reference(u[:, tail], delta[:, tail], A[tail], B, C, D[tail], None, None, True)
    assert _rel(out[:, tail], ref) < 1e-2
    del u, delta, out


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    cand = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    if cand is not None and cand.exists():
        return str(cand)
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.skipif(torch.version.cuda is None, reason="torch was built without CUDA")
def test_cuda_sources_compile_for_sm90():
    """Compiles csrc/*.cu for sm_90 against the installed torch headers (no GPU needed).

    Only the float32 instantiations are generated (ZOO_SCAN_CI_FLOAT_ONLY; the L-parallel kernels also
    only their general d_state class) and ptxas does not optimise (-Xptxas -O0), to stay within the CI
    budget; the half/bfloat16 variants differ only in their load/store conversions, the d_state 1 / 16
    classes only in a compile-time N.
    """
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{REPO / 'csrc'}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    jobs = {}
    for src in sorted((REPO / "csrc").glob("*.cu")):  # one nvcc per file, all at once (CI has 2 cores)
        cmd = [_nvcc(), "-c", str(src), "-o", os.devnull, "-std=c++20", "-O1", "-Xptxas", "-O0", "--expt-relaxed-constexpr",
               "-gencode=arch=compute_90,code=sm_90", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DZOO_SCAN_CI_FLOAT_ONLY",
               "-Xcompiler", "-fPIC", *incs]
        jobs[src.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in jobs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"nvcc failed on {name}:\n{err[-4000:]}"
