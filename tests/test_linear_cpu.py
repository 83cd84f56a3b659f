"""``zoo_scan::grouped_linear`` (csrc/linear_cpu.cpp), the row mixers' x_proj on CPU, against a float64 matmul; and
``zoo.layers.Linear`` / ``zoo.ops.mixer.linear``, which run the models' linear layers on it where it beats the BLAS."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torch.nn.functional as F

from zoo.layers import Linear, use_zoo_linear_
from zoo.ops import mixer
from zoo.ops.compiled import kernels_available
from zoo.ops.mixer import batched_linear, cpu_isa, rows_projection

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


@pytest.mark.parametrize("M, K, N", [(13, 48, 9), (61, 97, 20), (25, 384, 44), (12, 5, 81), (7, 33, 96)])
def test_grouped_linear_adds_the_bias(M, K, N):
    """bias (G, N) through every tile width, including the zero-padded columns of the last panel."""
    g = torch.Generator().manual_seed(M + N)
    x, weight, bias = torch.randn(2, M, K, generator=g), torch.randn(2, N, K, generator=g), torch.randn(2, N, generator=g)
    got = torch.ops.zoo_scan.grouped_linear(x, weight, bias)
    ref = _reference(x, weight) + bias.double()[:, None, :]
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6 * K ** 0.5 * 4)


@pytest.mark.parametrize("M", [1365, 1366])
def test_grouped_linear_both_task_orders(M):
    """x of up to 256 KiB a group runs panel by panel (each task packs its own panel), larger x by row blocks over
    the weight packed whole: 1365 x 48 floats is the last size of the one, 1366 x 48 the first of the other."""
    g = torch.Generator().manual_seed(M)
    x, weight, bias = torch.randn(2, M, 48, generator=g), torch.randn(2, 44, 48, generator=g), torch.randn(2, 44, generator=g)
    got = torch.ops.zoo_scan.grouped_linear(x, weight, bias)
    ref = _reference(x, weight) + bias.double()[:, None, :]
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6 * 48 ** 0.5 * 4)


@pytest.mark.parametrize("K,N", [(1024, 341), (8200, 149)])
def test_grouped_linear_weight_in_column_chunks(K, N):
    """Row blocks sweep the packed weight in chunks of at most 1 MiB, each chunk over every row block (M 70: a
    short last block) before the next, in both groups: at K 1024 several panels a chunk and a short last chunk
    (22 portable 16-wide panels in chunks of 16, or 11 AVX-512 32-wide ones in chunks of 8); at K 8200 one panel
    a chunk, two panels being larger than 1 MiB."""
    g = torch.Generator().manual_seed(K)
    x, weight = torch.randn(2, 70, K, generator=g), torch.randn(2, N, K, generator=g)
    bias = torch.randn(2, N, generator=g)
    got = torch.ops.zoo_scan.grouped_linear(x, weight, bias)
    ref = _reference(x, weight) + bias.double()[:, None, :]
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
    bias = torch.randn(1, 3)
    out = torch.ops.zoo_scan.grouped_linear(torch.randn(1, 4, 0), torch.randn(1, 3, 0), bias)
    assert torch.equal(out, bias[:, None, :].expand(1, 4, 3))


def test_grouped_linear_refuses_bad_input():
    with pytest.raises(RuntimeError, match="x must be \\(groups, M, K\\) and weight \\(groups, N, K\\)"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(4, 5), torch.randn(1, 3, 5))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(2, 4, 5), torch.randn(2, 3, 6))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(2, 4, 5), torch.randn(1, 3, 5))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(1, 4, 5).double(), torch.randn(1, 3, 5).double())
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.zoo_scan.grouped_linear(torch.randn(2, 4, 5), torch.randn(2, 3, 5), torch.randn(3))


def test_grouped_linear_schema_and_fake_kernel():
    torch.library.opcheck(torch.ops.zoo_scan.grouped_linear, (torch.randn(2, 13, 48)[:, :, :40], torch.randn(2, 44, 40)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.zoo_scan.grouped_linear,
                          (torch.randn(1, 13, 40), torch.randn(1, 44, 40), torch.randn(1, 44)),
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
for M, K, N in [(13, 97, 9), (61, 48, 20), (25, 384, 44), (7, 33, 81), (70, 1024, 341)]:
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


def test_tiles_serve_linear_layers_with_avx2_or_avx512_and_without_intel_mkl():
    assert mixer._tiles_beat_blas_gemm() == (cpu_isa() in ("avx512", "avx2") and not mixer._blas_beats_own_tiles())


def _count_tile_calls(monkeypatch, tiles_faster: bool) -> list:
    calls = []
    real = torch.ops.zoo_scan.grouped_linear
    monkeypatch.setattr(mixer, "_tiles_beat_blas_gemm", lambda: tiles_faster)
    monkeypatch.setattr(torch.ops.zoo_scan, "grouped_linear", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (2, 61, 48), (2, 5, 7, 48)])
def test_linear_layer_on_the_tiles_matches_f_linear(monkeypatch, shape, bias):
    """Inference: the tiles (when they are the faster here, forced on) give F.linear's result for 2-D to 4-D
    inputs, contiguous or a column slice, with and without a bias."""
    calls = _count_tile_calls(monkeypatch, True)
    layer = Linear(48, 81, bias=bias)
    x = torch.randn(*shape[:-1], 100)[..., 20:68]
    with torch.inference_mode():
        got = layer(x)
    assert len(calls) == 1 and got.shape == (*shape[:-1], 81)
    ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_layer_keeps_f_linear_for_training_other_dtypes_and_autocast(monkeypatch):
    """Gradients on, float64, bf16 autocast, or tiles that lose to the BLAS here: F.linear, and gradients flow."""
    calls = _count_tile_calls(monkeypatch, True)
    layer = Linear(24, 40)
    x = torch.randn(3, 9, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        layer.double()(x.double().detach())
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x.detach()).dtype == torch.bfloat16
    assert calls == []
    monkeypatch.setattr(mixer, "_tiles_beat_blas_gemm", lambda: False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []


def test_linear_layer_keeps_the_state_dict_and_scripts():
    layer = Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.jit.script(layer)(x), F.linear(x, layer.weight, layer.bias))


def test_use_zoo_linear_swaps_plain_linears_in_place():
    """timm's Mlp gets the zoo forward on its plain nn.Linear layers; parameters and keys are untouched."""
    from timm.layers import Mlp

    class OwnLinear(torch.nn.Linear):
        pass

    mlp = Mlp(16, 32)
    mlp.extra = OwnLinear(4, 4)
    before = {k: v.data_ptr() for k, v in mlp.state_dict().items()}
    assert use_zoo_linear_(mlp) is mlp
    assert type(mlp.fc1) is Linear and type(mlp.fc2) is Linear and type(mlp.extra) is OwnLinear
    assert {k: v.data_ptr() for k, v in mlp.state_dict().items()} == before
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(mlp.fc2(mlp.act(mlp.fc1(x))), mlp(x))


@pytest.mark.parametrize("tiles_faster", [True, False])
def test_batched_linear_takes_the_tiles_or_bmm(monkeypatch, tiles_faster):
    calls = _count_tile_calls(monkeypatch, tiles_faster)
    x, weight = torch.randn(3, 29, 40), torch.randn(3, 50, 40)
    with torch.no_grad():
        got = batched_linear(x, weight)
    assert len(calls) == (1 if tiles_faster else 0)
    torch.testing.assert_close(got.double(), _reference(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["test_vim", "msvmamba_nano", "vmamba_tiny", "mambavision_tiny"])
def test_models_give_the_blas_result_on_the_tiles(monkeypatch, name):
    """A whole model's inference with its linear layers on the tiles (forced on, whatever this CPU is) against
    the same model on F.linear: Vim's in/out_proj, MSVMamba's, its ConvFFN and the SE-scaled out_proj."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    layer_weights = {m.weight.data_ptr() for m in model.modules() if isinstance(m, (Linear, torch.nn.Conv2d))}
    outs = {}
    for tiles_faster in (False, True):
        calls = _count_tile_calls(monkeypatch, tiles_faster)
        with torch.inference_mode():
            outs[tiles_faster] = model(x)
        on_tiles = [a for a in calls if a[1].data_ptr() in layer_weights]  # not x_proj (rows_projection)
        assert bool(on_tiles) == tiles_faster
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)
