"""An independent, differentiable selective-scan oracle for the tests (float64, written from the
recurrence as mamba-ssm documents it, sharing no code with zoo.ops).

    dt[t] = softplus(delta[t] + bias) (or delta[t] + bias)
    h[t]  = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * u[t]
    y[t]  = <h[t], C[t]> + D * u[t],  then y[t] * silu(z[t])

B/C: fixed (dim, N); (batch, N, L) shared by all channels; (batch, G, N, L) shared by each group of
dim / G consecutive channels. ``reverse`` walks t = L-1 .. 0 (each step still reads its own t,
z included), so it does not rely on flipping anything.
"""
from __future__ import annotations

import torch


def _operand_at(M: torch.Tensor, t: int, batch: int, dim: int) -> torch.Tensor:
    """B or C at step t as (batch, dim, N)."""
    if M.dim() == 2:
        return M.unsqueeze(0).expand(batch, -1, -1)
    if M.dim() == 3:
        return M[:, None, :, t].expand(-1, dim, -1)
    groups = M.shape[1]
    return torch.repeat_interleave(M[:, :, :, t], dim // groups, dim=1)


def oracle_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                return_last_state=False):
    f = lambda t: None if t is None else t.double()  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(f, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, L = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        # softplus written out (log1p(exp(x)), linear above 20 as torch and mamba-ssm do)
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(torch.clamp(dt, max=20))))
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = [None] * L
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        step = dt[:, :, t, None]
        h = torch.exp(step * A) * h + step * _operand_at(B, t, batch, dim) * u[:, :, t, None]
        y = (h * _operand_at(C, t, batch, dim)).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        if z is not None:
            y = y * z[:, :, t] * torch.sigmoid(z[:, :, t])
        ys[t] = y
    out = torch.stack(ys, dim=-1)
    return (out, h) if return_last_state else out


def rounded(t, dtype):
    """``t`` rounded to ``dtype`` and back to float64: the oracle is fed what the kernel reads."""
    return None if t is None else t.to(dtype).double()


def s4d_real_A(dim: int, n: int) -> torch.Tensor:
    """Mamba's S4D-real initialisation A = -(1..N) for every channel (the models' own init)."""
    return -torch.arange(1, n + 1, dtype=torch.float64).repeat(dim, 1)
