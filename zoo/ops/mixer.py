"""Vim's bidirectional mixer for inference in the (batch, L, dim) row layout: ``zoo_scan::bimamba_*`` ops.

The reference mixer transposes the in-projection to (batch, dim, L), runs one conv and one scan per
direction and transposes back; on CPU those copies and elementwise passes cost as much as the scan.
Here the work between the linear layers is two ops on rows with channels in the vector lanes:

* ``zoo_scan::bimamba_conv(x, weight, bias) -> u``: x (batch, L, dim); weight (2, dim, K) and bias
  (2, dim) of the forward (causal) and reverse (anti-causal) depthwise convs, official tap layout;
  u (2, batch, L, dim) = silu(conv + bias) of both directions.
* ``zoo_scan::bimamba_scan(u, delta, A, B, C, D, delta_bias, z, delta_softplus, scale, dt_weight=None) -> y``:
  u, delta (2, batch, L, dim); A (2, dim, N); B, C (2, batch, L, N); D, delta_bias (2, dim);
  z (batch, L, dim); y (batch, L, dim) = scale * (y_fwd + y_rev) * silu(z), the reverse direction
  scanned from the last step to the first. With ``dt_weight`` (2, dim, R) (see below), delta is
  dt_proj's rank-R input (2, batch, L, R).
* ``zoo_scan::rms_norm(x, weight, eps) -> y``: the blocks' RMSNorm, x (..., dim) float32; y = x * rsqrt(mean(x^2,
  -1) + eps) * weight, one pass per row for the statistic and one for y (the reference takes five).

MSVMamba's mixer works on the channels-last map its in-projection produces (``csrc/rows_cpu.cpp``):

* ``zoo_scan::depthwise_conv2d_silu(x, weight, bias, stride) -> u``: x (batch, H, W, C) with channel
  stride 1 (a column slice of the in-projection is fine); weight (C, 1, k, k), odd k, zero padding
  (k - 1) / 2; u (batch, H', W', C) = silu(conv + bias).
* ``zoo_scan::depthwise_conv2d_residual_gelu(x, x_bias, weight, bias) -> out``: ConvFFN's middle (stride 1):
  out = gelu(x' + conv(x') + bias) with x' = x + x_bias, so the 1x1 conv before it runs without its bias.
* ``zoo_scan::scan_orders(u, delta, A, B, C, D, delta_bias, orders, delta_softplus, dt_weight) -> y``: u, delta
  (batch, L, dim); A (dim, N); B, C (batch, L, N); D, delta_bias (dim); orders (K, L) int64, each a
  permutation of the tokens. The K traversals are scanned as one sequence (the state carried from one
  into the next); y (batch, K, L, dim) holds every order's outputs at the tokens' own positions.

VMamba's cross-scan is the same kernel with one parameter set per order:

* ``zoo_scan::scan_cross(u, delta, A, B, C, D, delta_bias, orders, delta_softplus, dt_weight) -> y``: u (batch, L,
  dim); delta (K, batch, L, dim); A (K, dim, N); B, C (batch, L, K, N); D, delta_bias (K, dim); orders
  (K, L). Order k is an independent scan (zero initial state) with its own inputs and parameters; y
  (batch, L, dim) is the sum of the K outputs at the tokens' own positions (scan, then cross-merge).

MSVMamba's epilogue, between the scans and out_proj (VMamba's without ``y_low``):

* ``zoo_scan::norm_merge_gate(y, y_low, height, width, low_height, low_width, norm_weight, norm_bias, eps, z)
  -> (out, sums)``: y (batch, height * width, d), channel stride 1; y_low None or (batch, K, low_height *
  low_width, d); z None or like y. v = LayerNorm(y) + bilinear upsample (align_corners=False) of
  sum_k LayerNorm(y_low[:, k]); out = v * silu(z) (v without z); sums (batch, d) = v summed over the tokens.

The x_proj of all three row paths (``rows_projection``), on CPU:

* ``zoo_scan::grouped_linear(x, weight, bias=None) -> y``: x (G, M, K) with a unit last stride, weight (G, N, K),
  bias None or (G, N); y (G, M, N) = x[g] @ weight[g].T + bias[g], float32 (``csrc/linear_cpu.cpp``: register
  tiles for the few-output shapes where the BLAS runs far below its large-GEMM rate). Through :func:`linear`
  (``zoo.layers.Linear``) it also runs the models' linear layers on CPUs where its tiles beat the BLAS.

The scans take an optional ``dt_weight``, dt_proj's weight ((dim, R); (K, dim, R) for ``scan_cross``, (2, dim, R)
for ``bimamba_scan``): delta is then the rank-R input of dt_proj ((batch, L, R) / (K, batch, L, R) / (2, batch,
L, R), any strides with a unit last one) and the kernel computes ``delta @ dt_weight.T`` per step, so the
full-width delta is never written (the GEMM with R = 3..24 inner products per output runs far below the
machine's rate).

All are inference ops (no autograd formula: training keeps the differentiable path). The CPU kernels
(``csrc/mixer_cpu.cpp``) take float32; the CUDA ones (``csrc/mixer_cuda.cu``, on the L-parallel scan)
also float16 / bfloat16 activations and serve the mixer only under ``ZOO_CUDA_SCAN=lparallel``
(opt-in until they have passed ``pytest -m cuda`` on a device).
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import compiled  # noqa: F401  (defines the zoo_scan library these ops join)
from ._build import cuda_scan_lparallel
from .selective_scan import resolve_backend

__all__ = ["batched_linear", "bimamba_rows", "fused_mixer_enabled", "in_image_chunks", "linear", "rows_projection",
           "cpu_isa", "cpu_intrinsics", "cpu_parallel_threads"]

_lib = torch.library.Library("zoo_scan", "FRAGMENT")
_lib.define("bimamba_conv(Tensor x, Tensor weight, Tensor bias) -> Tensor")
_lib.define(
    "bimamba_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor delta_bias, Tensor z, "
    "bool delta_softplus, float scale, Tensor? dt_weight=None) -> Tensor"
)

_lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")

_lib.define("depthwise_conv2d_silu(Tensor x, Tensor weight, Tensor? bias, int stride) -> Tensor")
_lib.define("depthwise_conv2d_residual_gelu(Tensor x, Tensor? x_bias, Tensor weight, Tensor? bias) -> Tensor")
_lib.define(
    "scan_orders(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor delta_bias, Tensor orders, "
    "bool delta_softplus, Tensor? dt_weight=None) -> Tensor"
)


_lib.define(
    "scan_cross(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor delta_bias, Tensor orders, "
    "bool delta_softplus, Tensor? dt_weight=None) -> Tensor"
)


# y[g] = x[g] @ weight[g].T + bias[g] (CPU): the row mixers' x_proj, whose few outputs the BLAS runs slowly, and
# the models' linear layers where the tiles beat the BLAS (zoo.ops.mixer.linear)
_lib.define("grouped_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")


_lib.define(
    "norm_merge_gate(Tensor y, Tensor? y_low, int height, int width, int low_height, int low_width, "
    "Tensor norm_weight, Tensor norm_bias, float eps, Tensor? z) -> (Tensor, Tensor)"
)


@torch.library.register_fake("zoo_scan::grouped_linear")
def _grouped_linear_fake(x, weight, bias=None):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1])


@torch.library.register_fake("zoo_scan::norm_merge_gate")
def _norm_merge_gate_fake(y, y_low, height, width, low_height, low_width, norm_weight, norm_bias, eps, z):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], y.shape[2]))


@torch.library.register_fake("zoo_scan::scan_cross")
def _scan_cross_fake(u, delta, A, B, C, D, delta_bias, orders, delta_softplus, dt_weight=None):
    return torch.empty_like(u)


@torch.library.register_fake("zoo_scan::depthwise_conv2d_silu")
def _depthwise_conv2d_silu_fake(x, weight, bias, stride):
    k, pad = weight.shape[-1], (weight.shape[-1] - 1) // 2
    batch, height, width, channels = x.shape
    size = [(n + 2 * pad - k) // stride + 1 for n in (height, width)]
    return x.new_empty((batch, *size, channels))


@torch.library.register_fake("zoo_scan::depthwise_conv2d_residual_gelu")
def _depthwise_conv2d_residual_gelu_fake(x, x_bias, weight, bias):
    return x.new_empty(x.shape)


@torch.library.register_fake("zoo_scan::scan_orders")
def _scan_orders_fake(u, delta, A, B, C, D, delta_bias, orders, delta_softplus, dt_weight=None):
    return u.new_empty((u.shape[0], orders.shape[0], *u.shape[1:]))


@torch.library.register_fake("zoo_scan::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("zoo_scan::bimamba_conv")
def _bimamba_conv_fake(x, weight, bias):
    return x.new_empty((2, *x.shape))


@torch.library.register_fake("zoo_scan::bimamba_scan")
def _bimamba_scan_fake(u, delta, A, B, C, D, delta_bias, z, delta_softplus, scale, dt_weight=None):
    return u.new_empty(u.shape[1:])


def _no_backward(ctx, *grads):
    raise RuntimeError(
        "zoo_scan's row-layout mixer ops (bimamba_*, rms_norm, depthwise_conv2d_*, scan_orders, scan_cross, "
        "norm_merge_gate) are "
        "inference ops without a backward; the Vim, MSVMamba and VMamba mixers use them only when gradients are off "
        "(torch.no_grad / torch.inference_mode)"
    )


for _op in ("zoo_scan::bimamba_conv", "zoo_scan::bimamba_scan", "zoo_scan::rms_norm",
            "zoo_scan::depthwise_conv2d_silu", "zoo_scan::depthwise_conv2d_residual_gelu", "zoo_scan::scan_orders",
            "zoo_scan::scan_cross", "zoo_scan::norm_merge_gate", "zoo_scan::grouped_linear"):
    torch.library.register_autograd(_op, _no_backward)


class _Direction(Protocol):
    """What one scan direction provides (zoo.models.vim.ScanDirection)."""

    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: torch.Tensor
    D: torch.Tensor
    dt_rank: int
    d_state: int


_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_mixer_enabled(x: torch.Tensor, op: str = "bimamba_scan") -> bool:
    """Whether the row-layout op ``zoo_scan::<op>`` serves ``x`` (``bimamba_scan``: :func:`bimamba_rows`;
    ``scan_orders`` / ``scan_cross``: MSVMamba's / VMamba's mixer): gradients off, the compiled kernels
    built, the selective-scan backend in use ``compiled`` (so ``ZOO_SCAN_BACKEND=reference`` still runs the
    reference mixer), and either a float32 CPU tensor or, only under ``ZOO_CUDA_SCAN=lparallel`` and for an
    op with a CUDA kernel, a float32 / float16 / bfloat16 CUDA tensor."""
    if torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy):  # FX symbolic tracing: reference layout
        return False
    if x.device.type == "cpu":
        if x.dtype != torch.float32:
            return False
    elif x.device.type != "cuda" or x.dtype not in _CUDA_DTYPES or not cuda_scan_lparallel():
        return False
    if resolve_backend(x.device).name != "compiled":
        return False
    return _row_kernel_built(x.device.type, op)


# Activation elements per image group on the CPU row path (4 MiB of float32 per tensor): a mixer keeps ~8 tensors
# of its inner width alive, and at MSVMamba's / VMamba's stride-4 stage a batch of 8 makes each 10-20 MiB, so
# every op streams them from DRAM; in groups this size they stay in the last-level cache.
_CHUNK_ELEMENTS = 1 << 20


def in_image_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    elements_per_image: int) -> torch.Tensor:
    """``fn(x)`` for a CPU ``x`` computed on groups of whole images along dim 0 and concatenated, when one
    image's activations (``elements_per_image`` per tensor) times the batch would overflow the cache
    budget. ``fn`` must treat the images independently (the mixers do: inference, no batch statistics)."""
    per_group = max(1, _CHUNK_ELEMENTS // max(1, elements_per_image))
    if x.device.type != "cpu" or per_group >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(group) for group in x.split(per_group)])


_kernels_found: set = set()  # (device type, op) pairs _row_kernel_built has found; a registered kernel stays


@torch.compiler.assume_constant_result  # torch.compile evaluates it once instead of tracing it
def _row_kernel_built(device_type: str, op: str) -> bool:
    # a library built ahead of time from older sources may lack these kernels; scan_orders has no CUDA one.
    # The dispatcher lookup took 5 us, called ~5 times a Vim block: 1.2 ms of a 15 ms batch-1 forward's overhead.
    if (device_type, op) in _kernels_found:
        return True
    found = torch._C._dispatch_has_kernel_for_dispatch_key(f"zoo_scan::{op}", "CPU" if device_type == "cpu" else "CUDA")
    if found:
        _kernels_found.add((device_type, op))
    return found


def _stacked(fwd: torch.Tensor, rev: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.stack([fwd, rev]).to(dtype)  # one cast after the stack (which promotes), not one per direction


_blas_faster: list = []  # _blas_beats_own_tiles' answer, once known (dynamo refuses a functools.cache wrapper)


@torch.compiler.assume_constant_result  # torch.compile evaluates it once instead of tracing it
def _blas_beats_own_tiles() -> bool:
    """Whether torch's BLAS runs x_proj's shapes faster than grouped_linear here: MKL on an Intel CPU, where it
    takes its tuned paths (ours ran at 0.5-0.8x of it on a 2-core AVX-512 Xeon); on the AMD EPYC of
    docs/kernels.md our tiles were 1.2-2.9x faster than it. Call only once the CPU kernels are built."""
    if not _blas_faster:
        _blas_faster.append(torch.backends.mkl.is_available() and torch.ops.zoo_scan.cpu_vendor() == "intel")
    return _blas_faster[0]


def rows_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x[g] @ weight[g].T`` for x (G, M, K) and weight (G, N, K): the row mixers' x_proj (dt_rank + 2 *
    d_state = 5..80 outputs). On float32 CPU tensors ``zoo_scan::grouped_linear``, unless torch's BLAS is
    the faster one on this CPU (``_blas_beats_own_tiles``), then ``torch.bmm``; on other devices ``torch.bmm``
    with the outputs zero-padded to a multiple of 16 and cut back."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        if _row_kernel_built("cpu", "grouped_linear") and not _blas_beats_own_tiles():
            return torch.ops.zoo_scan.grouped_linear(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))
    n = weight.shape[1]
    return torch.bmm(x, F.pad(weight, (0, 0, 0, -n % 16)).transpose(1, 2))[..., :n]


_tiles_faster: list = []  # _tiles_beat_blas_gemm's answer, once known


@torch.compiler.assume_constant_result
def _tiles_beat_blas_gemm() -> bool:
    """Whether grouped_linear's tiles run the models' linear layers (48..768 inputs, 96..1536 outputs) faster
    than torch's BLAS: yes on a non-Intel CPU with AVX2 or AVX-512, where MKL takes its Zen kernels; on the
    2-core Zen 4 of docs/kernels.md the AVX-512 tiles ran at 1.02-1.38x MKL's rate and the AVX2 ones (the same
    source built for x86-64-v3, benchmarks/bench_linear_cpu.py --avx2) at 1.05-1.56x. No on Intel, where MKL
    has its tuned paths (our tiles ran at 0.5-0.8x of it there), nor on CPUs below AVX2. Call only once the CPU
    kernels are built."""
    if not _tiles_faster:
        _tiles_faster.append(torch.ops.zoo_scan.cpu_isa() in ("avx512", "avx2") and not _blas_beats_own_tiles())
    return _tiles_faster[0]


def _gemm_on_tiles(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear` / :func:`batched_linear` run on ``zoo_scan::grouped_linear``: float32 CPU tensors,
    gradients off and no autocast, the compiled backend in use (as for the fused mixers,
    :func:`fused_mixer_enabled`) and tiles that beat the BLAS here (:func:`_tiles_beat_blas_gemm`)."""
    return (not isinstance(x, torch.fx.Proxy) and x.dim() >= 2 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")
            and fused_mixer_enabled(x, "grouped_linear") and _tiles_beat_blas_gemm())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on the zoo's GEMM tiles where :func:`_gemm_on_tiles` allows."""
    if not _gemm_on_tiles(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.reshape(1, -1, x.shape[-1])
    y = torch.ops.zoo_scan.grouped_linear(rows, weight[None], None if bias is None else bias[None])
    return y.view(*x.shape[:-1], weight.shape[0])


def batched_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x[g] @ weight[g].T`` for x (G, M, K) and weight (G, N, K) (a weight per image, say), on the zoo's GEMM
    tiles where :func:`_gemm_on_tiles` allows, else ``torch.bmm``."""
    if not _gemm_on_tiles(x, weight, None):
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.ops.zoo_scan.grouped_linear(x, weight)


def bimamba_rows(xz: torch.Tensor, fwd: _Direction, rev: _Direction, scale: float) -> torch.Tensor:
    """Vim's mixer between its in- and out-projection: xz (batch, L, 2 * d_inner) -> (batch, L, d_inner).

    Same result as the reference path (conv, scan and gate per direction in (batch, dim, L)); the
    x_proj matmuls of both directions run as one batched matmul, and so do the dt_proj ones on CUDA
    (on CPU the scan applies dt_proj per step).
    """
    batch, L, _ = xz.shape
    d_inner, rank, N = fwd.D.shape[0], fwd.dt_rank, fwd.d_state
    x, z = xz[..., :d_inner], xz[..., d_inner:]
    conv_w = _stacked(fwd.conv1d.weight.squeeze(1), rev.conv1d.weight.squeeze(1))
    conv_b = _stacked(fwd.conv1d.bias, rev.conv1d.bias)
    u = torch.ops.zoo_scan.bimamba_conv(x, conv_w, conv_b)  # (2, batch, L, d_inner), x's dtype
    # the projections in the activations' dtype (float32 on CPU; fp16/bf16 models and autocast on CUDA)
    x_proj_w = _stacked(fwd.x_proj.weight, rev.x_proj.weight, u.dtype)
    x_dbl = rows_projection(u.view(2, batch * L, d_inner), x_proj_w).to(u.dtype)
    B = x_dbl[..., rank:rank + N].view(2, batch, L, N)
    C = x_dbl[..., rank + N:rank + 2 * N].view(2, batch, L, N)
    A = -torch.exp(_stacked(fwd.A_log, rev.A_log))
    dt_weight = _stacked(fwd.dt_proj.weight, rev.dt_proj.weight)
    if u.device.type == "cpu":
        # dt_proj inside the scan, from the rank-R slice as it lies in x_dbl: as a GEMM (R = 12..24 inner
        # products per output) it ran at a third of the machine's rate and wrote the full-width delta
        delta = x_dbl[..., :rank].view(2, batch, L, rank)
    else:
        # a contiguous copy of the rank-R slice first: bmm on the strided slice is ~2x slower than copy + bmm
        delta = torch.bmm(x_dbl[..., :rank].contiguous(), dt_weight.to(u.dtype).transpose(1, 2))
        delta, dt_weight = delta.to(u.dtype).view(2, batch, L, d_inner), None
    return torch.ops.zoo_scan.bimamba_scan(
        u, delta, A, B, C, _stacked(fwd.D, rev.D), _stacked(fwd.dt_proj.bias, rev.dt_proj.bias), z, True,
        float(scale), dt_weight,
    )


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with here: 'avx512', 'avx2' or 'baseline' (builds
    the kernels if needed; 'unavailable' when they cannot be built)."""
    ok, _ = compiled.kernels_available("cpu")
    return torch.ops.zoo_scan.cpu_isa() if ok else "unavailable"


def cpu_intrinsics() -> str:
    """The widest hand-written (intrinsics) paths the CPU kernels take here: 'avx512' (the scan steps of Vim,
    MSVMamba and VMamba, grouped_linear's wide tiles, 16-lane depthwise convs), 'avx2' (Vim's scan step) or
    'none'. The environment variable ``ZOO_CPU_INTRINSICS=0`` is the one switch back to the portable code (read
    once a process); 'none' also where the kernels cannot be built."""
    ok, _ = compiled.kernels_available("cpu")
    return str(torch.ops.zoo_scan.cpu_intrinsics()) if ok else "none"


def cpu_parallel_threads() -> int:
    """How many threads the CPU kernels' parallel loops run on at the current ``torch.get_num_threads()``
    (1 where they were built without OpenMP; 0 when they cannot be built)."""
    ok, _ = compiled.kernels_available("cpu")
    return int(torch.ops.zoo_scan.cpu_parallel_threads()) if ok else 0
