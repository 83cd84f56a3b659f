"""The hand-written (intrinsics) paths of the CPU kernels against the portable code on the same CPU.

On a CPU with AVX-512 the decaying scans (Vim's bimamba_scan, MSVMamba's scan_orders, VMamba's scan_cross)
take intrinsics steps (vreduceps / vscalefps for 2^x), grouped_linear takes 16-wide tiles and the depthwise
convs 16-lane sums; on an AVX2 CPU Vim's scan takes its AVX2 run (2^x reduced by multiply-adds with no clamp
where a run's exponents allow, else vroundps). ZOO_CPU_INTRINSICS=0 sends a process to the portable code. The
two run the multiply-adds in the same order; the hand-written steps' 2^x differ from the portable one by
rounding (each within 2.3e-7 relative), so they agree to 1e-5. Each side runs in its own process:
the switch is read once. On an AVX-512 CPU a third process loads the kernels built as an AVX2 CPU runs them
(zoo.ops._build.AS_AVX2_CFLAGS), so the AVX2 clones and paths are checked on every x86 machine with AVX2.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zoo.ops.compiled import kernels_available
from zoo.ops.mixer import cpu_isa

KERNELS, WHY = kernels_available("cpu")
pytestmark = pytest.mark.skipif(not KERNELS or cpu_isa() not in ("avx512", "avx2"),
                                reason=f"needs the CPU kernels ({WHY}) on a CPU with AVX2 or AVX-512")

_SCRIPT = r"""
import sys, timm, torch
import zoo
from zoo.ops import _build
from zoo.ops.mixer import cpu_intrinsics
if sys.argv[2] == "as-avx2":
    _build.load_cpu_variant(_build.AS_AVX2_CFLAGS)
g = torch.Generator().manual_seed(11)
outs = {"intrinsics": cpu_intrinsics()}
# Vim's scan: wide 32-lane blocks, 16-lane blocks and single lanes left over, with and without dt_proj folded in
for dim, L, N, R in [(32, 37, 16, 0), (40, 1, 16, 5), (56, 23, 8, 12), (64, 70, 16, 0)]:
    u, z = torch.randn(2, 2, L, dim, generator=g), torch.randn(2, L, dim, generator=g)
    x_dbl = torch.randn(2, 2, L, (R or dim) + 2 * N, generator=g)
    low, B, C = x_dbl[..., :R or dim], x_dbl[..., -2 * N:-N], x_dbl[..., -N:]
    dt_w = torch.randn(2, dim, R, generator=g) * 0.5 if R else None
    A = -torch.exp(torch.randn(2, dim, N, generator=g))
    D, bias = torch.randn(2, dim, generator=g), torch.randn(2, dim, generator=g) - 2
    outs[f"bimamba_scan {dim} {L} {N} {R}"] = torch.ops.zoo_scan.bimamba_scan(u, low, A, B, C, D, bias, z, True,
                                                                              0.5, dt_w)
for M, K, N in [(13, 97, 9), (61, 48, 20), (25, 384, 44)]:  # the 12 x 16, 12 x 32 and 8 x 48 tiles
    x, w = torch.randn(2, M, K, generator=g), torch.randn(2, N, K, generator=g)
    outs[f"grouped_linear {M} {K} {N}"] = torch.ops.zoo_scan.grouped_linear(x, w)
# the order scans of d_state 1 and Vim's scan through whole models (their CPU row paths)
for name in ("msvmamba_nano", "vmamba_tiny", "test_vim"):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        outs[name] = model(torch.randn(1, 3, 64, 64, generator=g))
torch.save(outs, sys.argv[1])
"""


_results: dict = {}


def _outputs(mode: str, tmp_path_factory) -> dict:
    """The script's outputs in a process of its own: "intrinsics" (the default library), "portable"
    (ZOO_CPU_INTRINSICS=0) or "as-avx2" (the kernels built as for an AVX2 CPU); run once per mode."""
    if mode not in _results:
        path = tmp_path_factory.mktemp("intrinsics") / f"{mode}.pt"
        env = {**os.environ, "ZOO_CPU_INTRINSICS": "0" if mode == "portable" else "1"}
        subprocess.run([sys.executable, "-c", _SCRIPT, str(path), mode], check=True, timeout=900, env=env)
        _results[mode] = torch.load(path, weights_only=True)
    return dict(_results[mode])


def _assert_outputs_close(fast: dict, portable: dict) -> None:
    assert fast.keys() == portable.keys()
    tol = 1e-5
    for key, out in fast.items():
        assert out.abs().max() > 0, key
        torch.testing.assert_close(out, portable[key], atol=tol, rtol=tol, msg=lambda m: f"{key}: {m}")


def test_intrinsics_paths_equal_the_portable_code(tmp_path_factory):
    fast, portable = _outputs("intrinsics", tmp_path_factory), _outputs("portable", tmp_path_factory)
    assert fast.pop("intrinsics") == cpu_isa()
    assert portable.pop("intrinsics") == "none"
    _assert_outputs_close(fast, portable)


@pytest.mark.skipif(cpu_isa() != "avx512", reason="the AVX2 build is the default library on an AVX2 CPU")
def test_avx2_build_equals_the_portable_code(tmp_path_factory):
    as_avx2, portable = _outputs("as-avx2", tmp_path_factory), _outputs("portable", tmp_path_factory)
    assert as_avx2.pop("intrinsics") == "avx2"
    portable.pop("intrinsics")
    # the portable side ran the x86-64-v4 clones, whose vectorised sums may group terms otherwise
    _assert_outputs_close(as_avx2, portable)
