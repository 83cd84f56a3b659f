"""``zoo_scan::grouped_linear`` (csrc/linear_cpu.cpp), the row mixers' x_proj on CPU, against a float64 matmul."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zoo.ops.compiled import kernels_available
from zoo.ops.mixer import cpu_isa, rows_projection

KERNELS, WHY = kernels_available("cpu")
pytestmark = pytest.mark.skipif(not KERNELS, reason=f"compiled CPU kernels unavailable: {WHY}")


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x.double(), weight.double().transpose(1, 2))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("M", [1, 13, 61])
@pytest.mark.parametrize("K", [1, 48, 97])
# portable tiles: 12 x 8 up to 8 outputs, 6 x 16 beyond; AVX-512: 12 x 16 for 9, 12 x 32 for 20, 8 x 48 for 44 and 81
@pytest.mark.parametrize("N", [1, 5, 8, 9, 20, 44, 81])
def test_grouped_linear_matches_a_float64_matmul(groups, M, K, N):
    """Every row tail (M not a multiple of the tile's 6 / 8 / 12 rows) and column tail (N past a panel)."""
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    x = torch.randn(groups, M, K, generator=g)
    weight = torch.randn(groups, N, K, generator=g)
    got = torch.ops.zoo_scan.grouped_linear(x, weight)
    assert got.shape == (groups, M, N) and got.dtype == torch.float32
    ref = _reference(x, weight)
    # float32 sums of K products: error ~ sqrt(K) * eps * |x| |w|
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6 * K ** 0.5 * 4)


def test_grouped_linear_reads_strided_rows_in_place():
    """x as the models pass it: a column slice (row stride > K) and a group stride that is not M * K."""
    base = torch.randn(3, 40, 100)
    x = base[1:3, 3:33, 10:58]  # (2, 30, 48), strides (4000, 100, 1)
    weight = torch.randn(2, 20, 48)
    torch.testing.assert_close(torch.ops.zoo_scan.grouped_linear(x, weight).double(), _reference(x, weight),
                               rtol=1e-5, atol=1e-5)


def test_grouped_linear_empty_sizes():
    assert torch.ops.zoo_scan.grouped_linear(torch.randn(2, 0, 5), torch.randn(2, 3, 5)).shape == (2, 0, 3)
    assert torch.ops.zoo_scan.grouped_linear(torch.randn(2, 4, 5), torch.randn(2, 0, 5)).shape == (2, 4, 0)
    out = torch.ops.zoo_scan.grouped_linear(torch.randn(1, 4, 0), torch.randn(1, 3, 0))
    assert out.shape == (1, 4, 3) and bool((out == 0).all())


def test_grouped_linear_refuses_bad_input():
    with pytest.raises(RuntimeError, match="x must be \\(groups, M, K\\) and weight \\(groups, N, K\\)"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(4, 5), torch.randn(1, 3, 5))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(2, 4, 5), torch.randn(2, 3, 6))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(2, 4, 5), torch.randn(1, 3, 5))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(1, 4, 5).double(), torch.randn(1, 3, 5).double())


def test_grouped_linear_schema_and_fake_kernel():
    torch.library.opcheck(torch.ops.zoo_scan.grouped_linear, (torch.randn(2, 13, 48)[:, :, :40], torch.randn(2, 44, 40)),
                          test_utils=("test_schema", "test_faketensor"))


def test_rows_projection_picks_the_kernel_or_the_blas_on_cpu_and_bmm_elsewhere(monkeypatch):
    """float32 CPU: the zoo kernel, or torch.bmm where the BLAS is MKL on an Intel CPU (its tuned paths beat
    our tiles there); float64 (no kernel): torch.bmm with the outputs padded and cut back."""
    from zoo.ops import mixer

    assert torch.ops.zoo_scan.cpu_vendor() in ("intel", "amd", "other")
    assert mixer._blas_beats_own_tiles() == (torch.backends.mkl.is_available()
                                             and torch.ops.zoo_scan.cpu_vendor() == "intel")
    x, weight = torch.randn(2, 9, 24), torch.randn(2, 44, 24)
    for blas_faster in (False, True):
        calls = []
        real = torch.ops.zoo_scan.grouped_linear
        monkeypatch.setattr(mixer, "_blas_beats_own_tiles", lambda: blas_faster)
        monkeypatch.setattr(torch.ops.zoo_scan, "grouped_linear", lambda *a: calls.append(1) or real(*a))
        out = rows_projection(x, weight)
        assert len(calls) == (0 if blas_faster else 1)
        torch.testing.assert_close(out.double(), _reference(x, weight), rtol=1e-5, atol=1e-5)
    out64 = rows_projection(x.double(), weight.double())
    assert out64.shape == (2, 9, 44)
    torch.testing.assert_close(out64, _reference(x, weight))


def test_grouped_linear_is_bit_identical_across_thread_counts():
    """Each output tile belongs to one task, so the thread count only changes who computes it."""
    x, weight = torch.randn(2, 301, 96), torch.randn(2, 44, 96)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.zoo_scan.grouped_linear(x, weight)
        torch.set_num_threads(2)
        two = torch.ops.zoo_scan.grouped_linear(x, weight)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


_PORTABLE_SCRIPT = r"""
import torch
from zoo.ops.mixer import cpu_intrinsics
assert cpu_intrinsics() == "none"
g = torch.Generator().manual_seed(3)
for M, K, N in [(13, 97, 9), (61, 48, 20), (25, 384, 44), (7, 33, 81)]:
    x, w = torch.randn(2, M, K, generator=g), torch.randn(2, N, K, generator=g)
    ref = torch.bmm(x.double(), w.double().transpose(1, 2))
    torch.testing.assert_close(torch.ops.zoo_scan.grouped_linear(x, w).double(), ref, rtol=1e-5, atol=1e-4)
"""


@pytest.mark.skipif(not KERNELS or cpu_isa() != "avx512", reason="needs a CPU with AVX-512")
def test_portable_tiles_on_an_avx512_cpu():
    """ZOO_CPU_INTRINSICS=0 keeps an AVX-512 CPU on the portable 6 x 16 tile, which then must be right too."""
    subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT], check=True,
                   env={**os.environ, "ZOO_CPU_INTRINSICS": "0"},
                   timeout=600)
