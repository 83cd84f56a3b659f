"""Pure-PyTorch selective scan: the backend that always works (any device, no compiler).

The recurrence, per batch b, channel d and state n, is

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]
    y[t] = <h[t], C[t]> + D * u[t]          (then y * silu(z) when z is given)

It runs step by step over time-major, contiguous slices with a cache-sized working set. On CPU that
measured faster than associative (log-depth) scans, blocked two-level scans and masked chunk
products, all of which are bound by the memory traffic of materialising (batch, D, N, L) tensors.
Autograd differentiates it directly. The compiled kernels in csrc/ are the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference", "selective_scan_naive"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 inputs are scanned in fp32; fp64 stays fp64 so gradcheck is meaningful
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare_delta(delta: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool, cdt: torch.dtype):
    delta = delta.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, dim, L) -> (batch, groups, dim // groups, L)."""
    b, d, l = x.shape
    return x.reshape(b, groups, d // groups, l)


def _state_operand(M: torch.Tensor, groups: int, cdt: torch.dtype) -> torch.Tensor:
    """B or C as a tensor broadcastable to (batch, groups, dim // groups, N, L)."""
    if M.dim() == 2:  # fixed (dim, N)
        d, n = M.shape
        return M.to(cdt).reshape(1, groups, d // groups, n, 1)
    return M.to(cdt).unsqueeze(2)  # (batch, G, N, L) -> (batch, G, 1, N, L)


def _time_major_operand(M: torch.Tensor, groups: int, L: int, cdt: torch.dtype) -> torch.Tensor:
    """B or C as (L or 1, batch or 1, G, Dg or 1, N) for the step loop."""
    if M.dim() == 2:
        d, n = M.shape
        return M.to(cdt).reshape(1, 1, groups, d // groups, n)
    return M.to(cdt).permute(3, 0, 1, 2).unsqueeze(3).contiguous()


def _as_grouped(M: torch.Tensor) -> torch.Tensor:
    """A 3-D variable B/C (batch, N, L) is one group: (batch, 1, N, L); autograd keeps its grad 3-D."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _num_groups(B: torch.Tensor, C: torch.Tensor) -> int:
    for M in (B, C):
        if M.dim() == 4:
            return M.shape[1]
    return 1


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
):
    """Reference scan. Arguments as :func:`zoo.ops.selective_scan` (already validated).

    ``reverse=True`` scans from t = L - 1 down to 0 (the result equals flipping every time-indexed
    input, scanning, and flipping the output back); the last state is then the one after t = 0.
    """
    B, C = _as_grouped(B), _as_grouped(C)
    if reverse:
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        B_, C_ = (M.flip(-1) if M.dim() == 4 else M for M in (B, C))
        res = selective_scan_reference(
            flip(u), flip(delta), A, B_, C_, D, flip(z), delta_bias, delta_softplus, return_last_state,
            reverse=False,
        )
        if return_last_state:
            return res[0].flip(-1), res[1]
        return res.flip(-1)

    out_dtype = u.dtype
    cdt = _compute_dtype(u.dtype)
    batch, dim, L = u.shape
    groups = _num_groups(B, C)
    uc = u.to(cdt)
    dt = _grouped(_prepare_delta(delta, delta_bias, delta_softplus, cdt), groups)  # (b, G, Dg, L)
    Ag = A.to(cdt).reshape(groups, dim // groups, A.shape[1])
    # time-major copies so that every step reads contiguous slices; the per-step working set stays
    # cache-sized, which on CPU beats materialising all (b, D, N, L) decay factors up front
    dt_tm = dt.movedim(-1, 0).unsqueeze(-1).contiguous()  # (L, b, G, Dg, 1)
    dtu_tm = dt_tm * _grouped(uc, groups).movedim(-1, 0).unsqueeze(-1)
    B_tm, C_tm = (_time_major_operand(M, groups, L, cdt) for M in (B, C))
    h = None
    ys = []
    for t in range(L):
        drive = dtu_tm[t] * B_tm[t if B_tm.shape[0] > 1 else 0]
        h = drive if h is None else torch.addcmul(drive, torch.exp(dt_tm[t] * Ag), h)
        ys.append((h * C_tm[t if C_tm.shape[0] > 1 else 0]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, L)
    if D is not None:
        y = y + uc * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(out_dtype)
    if return_last_state:
        return out, h.reshape(batch, dim, -1)
    return out


def selective_scan_naive(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """One step per token, written straight from the recurrence. The slow baseline and test oracle."""
    cdt = _compute_dtype(u.dtype)
    batch, dim, L = u.shape
    n = A.shape[1]
    B, C = _as_grouped(B), _as_grouped(C)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, cdt)
    uc = u.to(cdt)
    Af = A.to(cdt)

    def at(M, t):  # (batch, dim, N) operand at step t
        if M.dim() == 2:
            return M.to(cdt).unsqueeze(0).expand(batch, dim, n)
        return M[..., t].to(cdt).repeat_interleave(dim // M.shape[1], dim=1)

    h = torch.zeros(batch, dim, n, dtype=cdt, device=u.device)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uc[:, :, t])[..., None] * at(B, t)
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + uc * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out
