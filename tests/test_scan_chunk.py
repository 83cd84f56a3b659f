"""The chunk algebra of the L-parallel CUDA scan (csrc/scan_chunk.h), run on the CPU.

csrc/scan_chunk_host.cpp runs the header's functions lane by lane in the CUDA kernels' decomposition
(lanes per row in warps, R-step runs per lane, chunks carried across, two-pass segments, the
forward's chunk-boundary states reused by the backward, the adjoint as a reverse scan). Here it is
wrapped as an autograd function and composed with softplus / D / z / groups exactly as the kernels
do, then compared with zoo.ops.selective_scan_reference (float64 autograd) on model-range inputs:
A = -(1..N), delta 1e-4..30, L in {1, 7, 49, 197, 2048, 2049}, runs and chunks that do not divide L.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zoo.ops.reference import selective_scan_naive, selective_scan_reference

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = [CSRC / "scan_chunk_host.cpp", CSRC / "scan_chunk.h"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    out = tmp_path_factory.mktemp("chunk") / f"libzoo_chunk_{key}.so"
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{CSRC}", str(SOURCES[0]),
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    so = ctypes.CDLL(str(out))
    for fn in (so.zoo_chunk_fwd, so.zoo_chunk_bwd):
        fn.restype = ctypes.c_int
    return so


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


class _ChunkScan(torch.autograd.Function):
    """Per-row scan core through the host simulation: (dt, u, A, B, C) -> (y, last), rows independent."""

    @staticmethod
    def forward(ctx, lib, layout, dt, u, A, B, C):
        tpr, warp, R, seg_chunks = layout
        rows, L = dt.shape
        N = A.shape[1]
        nchunks = -(-L // (tpr * R))
        dt, u, A, B, C = (x.detach().double().contiguous() for x in (dt, u, A, B, C))
        y = torch.empty(rows, L, dtype=torch.float64)
        last = torch.empty(rows, N, dtype=torch.float64)
        ckpt = torch.empty(rows, nchunks, N, dtype=torch.float64)
        rc = lib.zoo_chunk_fwd(rows, L, N, tpr, warp, R, seg_chunks, *map(_ptr, (dt, u, A, B, C, y, last, ckpt)))
        assert rc == 0, rc
        ctx.save_for_backward(dt, u, A, B, C, ckpt)
        ctx.lib, ctx.layout = lib, layout
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        dt, u, A, B, C, ckpt = ctx.saved_tensors
        tpr, warp, R, seg_chunks = ctx.layout
        rows, L = dt.shape
        N = A.shape[1]
        dy = torch.zeros_like(dt) if dy is None else dy.double().contiguous()
        dlast = None if dlast is None else dlast.double().contiguous()
        du, ddt = torch.empty_like(dt), torch.empty_like(dt)
        dA, dB, dC = torch.empty_like(A), torch.empty_like(B), torch.empty_like(C)
        rc = ctx.lib.zoo_chunk_bwd(rows, L, N, tpr, warp, R, seg_chunks,
                                   *map(_ptr, (dt, u, A, B, C, dy, dlast, ckpt, du, ddt, dA, dB, dC)))
        assert rc == 0, rc
        return None, None, ddt, du, dA, dB, dC


def chunk_selective_scan(lib, layout, u, delta, A, B, C, D, z, delta_bias, softplus, reverse=False):
    """zoo.ops.selective_scan semantics on top of the simulated kernel core (float64)."""
    if reverse:
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        y, last = chunk_selective_scan(lib, layout, flip(u), flip(delta), A, *(M.flip(-1) if M.dim() == 4 else M
                                       for M in (B, C)), D, flip(z), delta_bias, softplus)
        return y.flip(-1), last
    batch, dim, L = u.shape
    N = A.shape[1]
    dt = delta + delta_bias[:, None] if delta_bias is not None else delta
    dt = F.softplus(dt) if softplus else dt

    def rows_of(M):  # (batch * dim, N, L), as each kernel row reads it
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, N, L).reshape(batch * dim, N, L)
        return M.repeat_interleave(dim // M.shape[1], dim=1).reshape(batch * dim, N, L)

    y, last = _ChunkScan.apply(lib, layout, dt.reshape(-1, L), u.reshape(-1, L),
                               A[None].expand(batch, dim, N).reshape(-1, N), rows_of(B), rows_of(C))
    y = y.view(batch, dim, L)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, last.view(batch, dim, N)


def _inputs(batch, dim, L, N, groups, var_b=True, var_c=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # model range: A = -(1..N) (S4D-real init), delta log-uniform over 1e-4..30 after softplus
    A = -torch.arange(1, N + 1, dtype=torch.float64).repeat(dim, 1) * (1 + 0.1 * torch.rand(dim, N, generator=g,
                                                                                           dtype=torch.float64))
    dt = torch.exp(torch.empty(batch, dim, L, dtype=torch.float64).uniform_(torch.log(torch.tensor(1e-4)).item(),
                                                                             torch.log(torch.tensor(30.0)).item(),
                                                                             generator=g))
    delta = torch.where(dt > 20, dt, torch.log(torch.expm1(dt)))  # softplus(delta) == dt
    return dict(
        u=r(batch, dim, L), delta=delta - 0.05, A=A,
        B=r(batch, groups, N, L) if var_b else r(dim, N), C=r(batch, groups, N, L) if var_c else r(dim, N),
        D=r(dim), z=r(batch, dim, L), bias=torch.full((dim,), 0.05, dtype=torch.float64),
    )


def _rel(a, b):
    if b is None:  # a gradient the reference never produced is zero (dA when L == 1)
        b = torch.zeros_like(a)
    return ((a - b).norm() / (b.norm() + 1e-300)).item()


# (tpr, warp, R, seg_chunks): lanes per row, lanes per warp, steps per lane, chunks per segment.
# Small warps exercise the cross-warp fold at small L; (64, 32, 8) is the device's chunk of 512.
CASES = [
    dict(L=1, N=1, groups=1, layout=(4, 2, 3, 1), reverse=False),
    dict(L=7, N=4, groups=2, layout=(2, 2, 3, 1), reverse=True),
    dict(L=7, N=16, groups=1, layout=(1, 1, 4, 1), reverse=False, var_c=False),
    dict(L=197, N=16, groups=1, layout=(8, 4, 3, 2), reverse=False),
    dict(L=49, N=1, groups=2, layout=(8, 8, 8, 1), reverse=True),
    dict(L=197, N=1, groups=4, layout=(12, 4, 4, 3), reverse=True, var_b=False),
    dict(L=2048, N=4, groups=1, layout=(64, 32, 8, 1), reverse=False),
    dict(L=2049, N=2, groups=2, layout=(32, 32, 8, 3), reverse=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{L}-N{N}-G{groups}-tpr{layout[0]}-R{layout[2]}".format(**c))
def test_chunk_algebra_matches_reference_forward_and_gradients(lib, case):
    t = _inputs(2, 4, case["L"], case["N"], case["groups"], case.get("var_b", True), case.get("var_c", True),
                seed=case["L"] + case["N"])
    names = ["u", "delta", "A", "B", "C", "D", "z", "bias"]
    ours = {k: t[k].clone().requires_grad_(True) for k in names}
    ref = {k: t[k].clone().requires_grad_(True) for k in names}
    y, last = chunk_selective_scan(lib, case["layout"], *(ours[k] for k in names), True, case["reverse"])
    ry, rlast = selective_scan_reference(*(ref[k] for k in names), True, True, reverse=case["reverse"])
    assert _rel(y, ry) < 1e-10, _rel(y, ry)
    assert _rel(last, rlast) < 1e-10
    wy, wl = torch.randn_like(ry), torch.randn_like(rlast)
    ((y * wy).sum() + (last * wl).sum()).backward()
    ((ry * wy).sum() + (rlast * wl).sum()).backward()
    for k in names:
        assert _rel(ours[k].grad, ref[k].grad) < 1e-9, (k, _rel(ours[k].grad, ref[k].grad))


def test_chunk_algebra_matches_naive_oracle_and_every_layout_agrees(lib):
    t = _inputs(1, 3, 197, 16, 1, seed=3)
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")]
    naive = selective_scan_naive(*args, True, True)
    # (8, 8, 8, .) and (16, 16, 8, .): the device's rows of 8 / 16 lanes sharing a warp (short L)
    layouts = [(1, 1, 1, 1), (5, 2, 3, 2), (32, 32, 8, 1), (3, 32, 4, 7), (8, 8, 8, 2), (16, 16, 8, 1)]
    outs = [chunk_selective_scan(lib, layout, *args, True) for layout in layouts]
    for y, last in outs:
        assert _rel(y, naive[0]) < 1e-10
        assert _rel(last, naive[1]) < 1e-10


def test_chunk_algebra_gradcheck(lib):
    t = _inputs(1, 2, 11, 3, 1, seed=4)
    t["delta"] = 0.5 * torch.randn(1, 2, 11, dtype=torch.float64)  # keep dt near 1 for finite differences
    names = ["u", "delta", "A", "B", "C", "D", "z", "bias"]
    leaves = [t[k].clone().requires_grad_(True) for k in names]

    def fn(*xs):
        y, last = chunk_selective_scan(lib, (2, 2, 3, 2), *xs, True)
        return y, last

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_chunk_host_rejects_unsupported_run(lib):
    z = torch.zeros(1, 4, dtype=torch.float64)
    A = -torch.ones(1, 1, dtype=torch.float64)
    B = torch.zeros(1, 1, 4, dtype=torch.float64)
    outs = [torch.empty(1, 4, dtype=torch.float64), torch.empty(1, 1, dtype=torch.float64),
            torch.empty(1, 4, 1, dtype=torch.float64)]
    assert lib.zoo_chunk_fwd(1, 4, 1, 1, 1, 5, 1, *map(_ptr, (z, z, A, B, B, *outs))) == 1
    assert lib.zoo_chunk_fwd(1, 4, 1, 0, 1, 4, 1, *map(_ptr, (z, z, A, B, B, *outs))) == 2
