"""Selective-state-space (Mamba) building blocks shared by the zoo's vision Mamba families.

A Mamba mixer is, per scan direction: a depthwise conv and SiLU giving ``u``; a per-token projection
``x_proj`` giving a low-rank ``dt`` and the input-dependent ``B``, ``C``; ``dt_proj`` lifting ``dt``
to one step size per channel (its bias is handed to the scan as ``delta_bias`` and softplus is applied
inside the scan); the parameters ``A = -exp(A_log)`` and ``D``; then :mod:`zoo.ops`' selective scan.
This module holds every one of those pieces once, so that a model file only wires them together.

Initialisation (Mamba's, as the official Vim / VMamba / MSVMamba / MambaVision code uses it):

* :func:`s4d_real_A_log` -- S4D-real ``A_log = log(1..N)`` for every channel.
* :func:`init_dt_bias_` -- ``dt_proj.bias = softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]``
  and floored at ``dt_init_floor``. :func:`init_dt_proj_weight_` -- ``U(+-dt_scale / sqrt(dt_rank))``.
* :func:`init_stacked_ssm_` -- all of the above for the stacked ``(K, ...)`` parameter layout of
  VMamba-style mixers (``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds``).

The fp32 rule: the SSM parameters (A, D, delta_bias) enter the scan in fp32 whatever the model's dtype
(float64 stays float64 so gradchecks mean something): :func:`fp32_or_wider`, :func:`ssm_parameters`.

Projection: :func:`dt_bc_projection` -- tokens -> ``(delta, B, C)`` in the layout the scan takes,
for one direction (weights ``(R + 2N, D)`` / ``(D, R)``); :func:`dt_bc_projection_stacked` for K
stacked directions at once (weights ``(K, R + 2N, D)`` / ``(K, D, R)``, giving B / C as the scan's
``(batch, K, N, L)`` groups); :func:`stacked_ssm_inputs` -- one slot of the stacked layout.

Blocks:

* :class:`ScanDirection1d` -- one 1-D direction (conv1d, x_proj, dt_proj, A_log, D): causal (Mamba,
  Vim's forward direction), anti-causal for a direction read back to front (Vim's backward direction,
  without flipping any tensor), or ``'same'``-padded (MambaVision's non-causal mixer).
* :func:`cross_scan_2d` / :func:`cross_merge_2d` -- lay a (B, D, H, W) map out in several traversal
  orders (row-major, column-major and their reverses: the names of :data:`zoo.ops.SCAN_ORDERS`) as
  ``(B, K, D, H*W)``, and put the K scanned outputs back on their pixels and sum them (VMamba's
  4-direction cross scan).

Scan entry points :func:`scan`, :func:`scan_bidirectional` and :func:`scan_multi_direction` call
:mod:`zoo.ops` (which picks the compiled kernel or the reference). They are TorchScript-ignored and
registered with timm as FX leaves (``register_notrace_function``), so a model built from these layers
scripts and traces like timm's own families; the ops' own input checks then run on real tensors.
"""
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .helpers import leaf_function

from zoo.ops import (
    SCAN_ORDERS,
    selective_scan,
    selective_scan_bidirectional,
    selective_scan_multi_direction,
)

__all__ = [
    "ScanDirection1d",
    "ScanInputs",
    "cross_merge_2d",
    "cross_scan_2d",
    "dt_bc_projection",
    "dt_bc_projection_stacked",
    "fp32_or_wider",
    "init_dt_bias_",
    "init_dt_proj_weight_",
    "init_stacked_ssm_",
    "inverse_softplus",
    "s4d_real_A_log",
    "scan",
    "scan_bidirectional",
    "scan_multi_direction",
    "ssm_parameters",
    "stacked_ssm_inputs",
]

CONV_MODES = ("causal", "same")

# the ops' entry points are leaves for timm's FX feature extraction too (their checks need real tensors)
for _entry in (selective_scan, selective_scan_bidirectional, selective_scan_multi_direction):
    register_notrace_function(_entry)


# --- the fp32 rule ------------------------------------------------------------------------------------
@torch.fx.wrap  # branches on the dtype: a leaf for FX (also when called from this module)
@register_notrace_function
def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or unchanged if it is float64 (SSM parameters never run in half precision)."""
    return t if t.dtype == torch.float64 else t.float()


def ssm_parameters(
    A_log: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(A, D, delta_bias)`` as the scan takes them: ``A = -exp(A_log)``, all fp32 (or float64)."""
    A = -torch.exp(fp32_or_wider(A_log))
    D = fp32_or_wider(D) if D is not None else None
    delta_bias = fp32_or_wider(delta_bias) if delta_bias is not None else None
    return A, D, delta_bias


# --- initialisation -----------------------------------------------------------------------------------
def s4d_real_A_log(d_inner: int, d_state: int) -> torch.Tensor:
    """S4D-real init: ``A = -(1, 2, ..., d_state)`` for each of ``d_inner`` channels, as ``log(-A)`` (fp32)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``y`` with ``softplus(y) == x`` (x > 0), written to stay accurate for small x."""
    return x + torch.log(-torch.expm1(-x))


@torch.no_grad()
def init_dt_bias_(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                  dt_init_floor: float = 1e-4) -> torch.Tensor:
    """Fills ``bias`` (any shape) so that ``softplus(bias)`` is log-uniform in ``[dt_min, dt_max]``.

    Step sizes below ``dt_init_floor`` are raised to it. Draws ``bias.numel()`` uniforms from the
    default generator (``torch.rand_like``).
    """
    log_dt = torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_init_floor)
    return bias.copy_(inverse_softplus(dt))


@torch.no_grad()
def init_dt_proj_weight_(weight: torch.Tensor, dt_rank: int, dt_scale: float = 1.0) -> torch.Tensor:
    """``dt_proj.weight ~ U(-s, s)`` with ``s = dt_scale / sqrt(dt_rank)`` (Mamba's 'random' dt init)."""
    std = dt_rank ** -0.5 * dt_scale
    return nn.init.uniform_(weight, -std, std)


@torch.no_grad()
def init_stacked_ssm_(
    x_proj_weight: torch.Tensor,
    dt_projs_weight: torch.Tensor,
    dt_projs_bias: torch.Tensor,
    A_logs: torch.Tensor,
    Ds: torch.Tensor,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
    dt_scale: float = 1.0,
) -> None:
    """Mamba init of the stacked layout of K directions (VMamba's ``SS2D``, MSVMamba's two slots).

    Shapes: ``x_proj_weight (K, R + 2N, D)`` ~ U(+-1/sqrt(D)); ``dt_projs_weight (K, D, R)`` as
    :func:`init_dt_proj_weight_`; ``dt_projs_bias (K, D)`` as :func:`init_dt_bias_`; ``A_logs (K*D, N)``
    S4D-real; ``Ds (K*D,)`` ones. The random draws happen in that order.
    """
    d_inner, dt_rank = dt_projs_weight.shape[-2:]
    bound = d_inner ** -0.5
    nn.init.uniform_(x_proj_weight, -bound, bound)
    init_dt_proj_weight_(dt_projs_weight, dt_rank, dt_scale)
    init_dt_bias_(dt_projs_bias, dt_min, dt_max, dt_init_floor)
    A_logs.copy_(s4d_real_A_log(A_logs.shape[0], A_logs.shape[1]))
    Ds.fill_(1.0)


# --- projection -----------------------------------------------------------------------------------------
def dt_bc_projection(
    x: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    d_state: int,
    tokens_last: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of one direction -> the scan's ``(delta, B, C)`` (``delta`` without its bias: the scan adds it).

    ``x`` is ``(batch, D, L)`` (or ``(batch, L, D)`` with ``tokens_last``), ``x_proj_weight (R + 2N, D)``,
    ``dt_proj_weight (D, R)``. Returns ``delta (batch, D, L)`` and ``B, C (batch, 1, N, L)`` (one group).
    """
    sizes = [dt_proj_weight.shape[-1], d_state, d_state]
    if tokens_last:
        proj = F.linear(x, x_proj_weight).transpose(1, 2)  # per token: (batch, R + 2N, L)
        dt, B, C = torch.split(proj, sizes, dim=1)
        delta = F.linear(dt.transpose(1, 2), dt_proj_weight).transpose(1, 2)
    else:
        proj = torch.einsum("bdl,cd->bcl", x, x_proj_weight)
        dt, B, C = torch.split(proj, sizes, dim=1)
        delta = torch.einsum("brl,dr->bdl", dt, dt_proj_weight)
    return delta, B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous()


def dt_bc_projection_stacked(
    x: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, d_state: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K stacked directions at once (VMamba's ``SS2D`` layout): ``x (batch, K, D, L)``, weights
    ``(K, R + 2N, D)`` and ``(K, D, R)`` -> ``delta (batch, K, D, L)``, ``B, C (batch, K, N, L)``.

    Flatten delta (and u) to ``(batch, K * D, L)`` for one scan whose K groups are the directions.
    """
    sizes = [dt_proj_weight.shape[-1], d_state, d_state]
    proj = torch.einsum("bkdl,kcd->bkcl", x, x_proj_weight)
    dt, B, C = torch.split(proj, sizes, dim=2)
    delta = torch.einsum("bkrl,kdr->bkdl", dt, dt_proj_weight)
    return delta, B.contiguous(), C.contiguous()


class ScanInputs(NamedTuple):
    """Everything one direction hands to the selective scan, in original token order."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: Optional[torch.Tensor]
    delta_bias: Optional[torch.Tensor]


def stacked_ssm_inputs(
    x: torch.Tensor,
    slot: int,
    x_proj_weight: torch.Tensor,
    dt_projs_weight: torch.Tensor,
    dt_projs_bias: torch.Tensor,
    A_logs: torch.Tensor,
    Ds: torch.Tensor,
) -> ScanInputs:
    """The scan inputs of direction ``slot`` of a stacked-layout mixer, for tokens ``x (batch, D, L)``."""
    d_inner = dt_projs_weight.shape[1]
    delta, B, C = dt_bc_projection(x, x_proj_weight[slot], dt_projs_weight[slot], A_logs.shape[1])
    lo, hi = slot * d_inner, (slot + 1) * d_inner
    A, D, delta_bias = ssm_parameters(A_logs[lo:hi], Ds[lo:hi], dt_projs_bias[slot])
    return ScanInputs(x, delta, A, B, C, D, delta_bias)


# --- one 1-D direction ----------------------------------------------------------------------------------
class ScanDirection1d(nn.Module):
    """Parameters and input preparation of one 1-D scan direction of a Mamba mixer.

    Args:
        d_inner, d_state, dt_rank, d_conv: channels, state size, dt rank, depthwise conv taps.
        reverse: the direction reads the sequence from the last token to the first. Its causal conv is
            then applied anti-causally (mirrored taps), so inputs and outputs stay in original order and
            the caller scans with ``reverse=True`` instead of flipping tensors.
        conv: ``'causal'`` (Mamba) or ``'same'`` (symmetric padding, MambaVision's non-causal mixer).
        conv_bias: bias of the depthwise conv.

    ``conv1d.weight`` keeps the official layout (with ``'causal'``, tap k multiplies the token
    ``d_conv - 1 - k`` steps earlier in the direction's reading order), so official weights load as is.
    ``forward(x (B, d_inner, L))`` returns :class:`ScanInputs` with the fp32 rule applied.
    """

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int = 4, reverse: bool = False,
                 conv: str = "causal", conv_bias: bool = True):
        super().__init__()
        if conv not in CONV_MODES:
            raise ValueError(f"ScanDirection1d: conv={conv!r} is not supported; accepted: {CONV_MODES}")
        if reverse and conv != "causal":
            raise ValueError("ScanDirection1d: reverse=True only changes a 'causal' conv; use conv='causal'")
        self.reverse = reverse
        self.conv = conv
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(s4d_real_A_log(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def conv_act(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(depthwise conv(x)) on (B, d_inner, L), in original token order."""
        k = self.conv1d.kernel_size[0]
        weight, bias, groups = self.conv1d.weight, self.conv1d.bias, x.shape[1]
        if self.conv == "same":  # as padding='same': (k - 1) // 2 taps before, the rest after
            u = F.conv1d(F.pad(x, ((k - 1) // 2, k - 1 - (k - 1) // 2)), weight, bias, groups=groups)
        elif self.reverse:
            # a causal conv over the reversed sequence == an anti-causal conv with mirrored taps
            u = F.conv1d(F.pad(x, (0, k - 1)), weight.flip(-1), bias, groups=groups)
        else:
            u = F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, groups=groups)
        return F.silu(u)

    def forward(self, x: torch.Tensor) -> ScanInputs:
        u = self.conv_act(x)
        # per token, so the reading order does not matter
        delta, B, C = dt_bc_projection(u.transpose(1, 2), self.x_proj.weight, self.dt_proj.weight, self.d_state,
                                       tokens_last=True)
        A, D, delta_bias = ssm_parameters(self.A_log, self.D, self.dt_proj.bias)
        return ScanInputs(u, delta, A, B, C, D, delta_bias)


# --- 2-D cross scan -------------------------------------------------------------------------------------
@torch.fx.wrap  # runs on real shapes when traced
@leaf_function
def check_scan_orders(orders: List[str], num_directions: int) -> None:
    bad = [o for o in orders if o not in SCAN_ORDERS]
    if not orders or bad:
        raise ValueError(f"scan orders {tuple(orders)} must be names from {SCAN_ORDERS}")
    if num_directions >= 0 and num_directions != len(orders):
        raise ValueError(f"cross_merge_2d: y has {num_directions} directions but {len(orders)} orders were given")


def cross_scan_2d(x: torch.Tensor, orders: List[str]) -> torch.Tensor:
    """(B, D, H, W) map -> (B, K, D, H * W): the map read in each of the K ``orders``.

    Orders: ``'row'`` (row-major), ``'row_reversed'``, ``'col'`` (column-major), ``'col_reversed'``.
    """
    check_scan_orders(orders, -1)
    row = x.flatten(2)
    col = x.transpose(-1, -2).flatten(2)
    seqs = []
    for order in orders:
        seq = row if order.startswith("row") else col
        seqs.append(seq.flip(-1) if order.endswith("_reversed") else seq)
    return torch.stack(seqs, dim=1)


def cross_merge_2d(y: torch.Tensor, height: int, width: int, orders: List[str]) -> torch.Tensor:
    """(B, K, D, H * W) outputs of :func:`cross_scan_2d`'s orders -> (B, D, H * W) row-major, summed."""
    check_scan_orders(orders, y.shape[1])
    out = torch.zeros_like(y[:, 0])
    for k, order in enumerate(orders):
        seq = y[:, k].flip(-1) if order.endswith("_reversed") else y[:, k]
        if order.startswith("col"):
            seq = seq.reshape(seq.shape[0], seq.shape[1], width, height).transpose(-1, -2).flatten(2)
        out = out + seq
    return out


# --- scan entry points ---------------------------------------------------------------------------------
# Each entry point is an FX leaf (timm's register_notrace_function) and compiles under TorchScript with
# its defaults; the zoo.ops call itself sits in a TorchScript-ignored helper (ignored functions lose
# their default arguments, and zoo.ops' dispatch is Python).
@torch.jit.ignore
def _ops_scan(inputs: ScanInputs, z: Optional[torch.Tensor], reverse: bool, delta_softplus: bool) -> torch.Tensor:
    return selective_scan(inputs.u, inputs.delta, inputs.A, inputs.B, inputs.C, inputs.D, z, inputs.delta_bias,
                          delta_softplus, reverse=reverse)


@torch.jit.ignore
def _ops_scan_bidirectional(fwd: ScanInputs, bwd: ScanInputs, z: Optional[torch.Tensor],
                            scale: float) -> torch.Tensor:
    return selective_scan_bidirectional(
        fwd.u, fwd.delta, fwd.A, fwd.B, fwd.C, fwd.D, fwd.delta_bias,
        bwd.u, bwd.delta, bwd.A, bwd.B, bwd.C, bwd.D, bwd.delta_bias,
        z=z, delta_softplus=True, scale=scale,
    )


@torch.jit.ignore
def _ops_scan_multi_direction(inputs: ScanInputs, height: int, width: int, orders: List[str]) -> torch.Tensor:
    return selective_scan_multi_direction(
        inputs.u, inputs.delta, inputs.A, inputs.B, inputs.C, inputs.D, inputs.delta_bias,
        height=height, width=width, orders=tuple(orders), delta_softplus=True,
    )


@torch.fx.wrap
@register_notrace_function
def scan(inputs: ScanInputs, z: Optional[torch.Tensor] = None, reverse: bool = False,
         delta_softplus: bool = True) -> torch.Tensor:
    """One direction through :func:`zoo.ops.selective_scan` (output only; ``reverse`` reads L-1 .. 0)."""
    return _ops_scan(inputs, z, reverse, delta_softplus)


@torch.fx.wrap
@register_notrace_function
def scan_bidirectional(fwd: ScanInputs, bwd: ScanInputs, z: Optional[torch.Tensor] = None,
                       scale: float = 0.5) -> torch.Tensor:
    """``scale * (scan(fwd) + reverse scan(bwd)) * silu(z)`` (:func:`zoo.ops.selective_scan_bidirectional`)."""
    return _ops_scan_bidirectional(fwd, bwd, z, scale)


@torch.fx.wrap
@register_notrace_function
def scan_multi_direction(inputs: ScanInputs, height: int, width: int, orders: List[str]) -> torch.Tensor:
    """Several traversals of a map scanned as one sequence, state carried across
    (:func:`zoo.ops.selective_scan_multi_direction`): (B, K, D, H * W), each back in row-major order."""
    return _ops_scan_multi_direction(inputs, height, width, orders)
