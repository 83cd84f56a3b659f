"""Benchmark-only adapter: run zoo's own models and ops on mamba-ssm's ``selective_scan_cuda`` kernel.

So that "zoo kernels" and "official kernels" are compared on identical models in one run, this
registers a ``zoo.ops`` scan backend named ``mamba_ssm`` that calls mamba-ssm's extension the way
its ``selective_scan_fn`` does (reverse scans and Vim's two directions through flipped copies, as
the official Vim code does). It is never a runtime backend of the zoo: nothing outside
``benchmarks/`` imports it, and it registers only when asked:

    from mamba_adapter import enable
    if enable():                                  # False when selective_scan_cuda is not there
        os.environ["ZOO_SCAN_BACKEND"] = "mamba_ssm"   # or selective_scan(..., backend="mamba_ssm")

The extension is imported when installed, else JIT-built from ``$MAMBA_SSM_SRC`` (an unpacked
mamba-ssm sdist) by ``bench_scan.load_mamba``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

BACKEND = "mamba_ssm"
_ext = None


class _MambaScanFn(torch.autograd.Function):
    """One forward scan on mamba-ssm's kernel; inputs already in the layouts it accepts."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        out, x, *rest = _ext.fwd(u, delta, A, B, C, D, z, bias, softplus)
        ctx.softplus, ctx.has_z = softplus, z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, x, out)
        last = x[:, :, -1, 1::2]  # the kernel keeps (decay, state) pairs per chunk; the last chunk's states
        return (rest[0] if z is not None else out), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, x, out = ctx.saved_tensors
        grads = _ext.bwd(u, delta, A, B, C, D, z, bias, dout.contiguous(), x, out, None, ctx.softplus, False)
        du, ddelta, dA, dB, dC, dD, dbias = grads[:7]
        dz = grads[7] if ctx.has_z else None
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz, dbias if bias is not None else None, None)


def _flip(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.flip(-1)


def _scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
          reverse=False):
    """``zoo.ops.selective_scan`` semantics (inputs validated by zoo) on mamba-ssm's kernel."""
    if reverse:  # mamba-ssm has no reverse scan: flip every time-indexed input, as the official code does
        u, delta, z = _flip(u), _flip(delta), _flip(z)
        B, C = (M.flip(-1) if M.dim() == 4 else M for M in (B, C))
    dtype = u.dtype
    prep = lambda M: (M.to(dtype) if M.dim() == 4 else M.float()).contiguous()  # noqa: E731
    out, last = _MambaScanFn.apply(
        u.contiguous(), delta.to(dtype).contiguous(), A.float().contiguous(), prep(B), prep(C),
        None if D is None else D.float().contiguous(), None if z is None else z.to(dtype).contiguous(),
        None if delta_bias is None else delta_bias.float().contiguous(), bool(delta_softplus))
    if reverse:
        out = out.flip(-1)
    return (out, last) if return_last_state else out


def _bidirectional(u, delta, A, B, C, D, delta_bias, u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev, delta_bias_rev,
                   z=None, delta_softplus=True, scale=0.5):
    y = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y_rev = _scan(u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev, z, delta_bias_rev, delta_softplus, reverse=True)
    return (y + y_rev) * scale  # each already gated by silu(z): the gate is linear in y


def _probe(device: torch.device) -> Tuple[bool, str]:
    if _ext is None:
        return False, "mamba-ssm's selective_scan_cuda is not loaded (benchmarks/mamba_adapter.enable)"
    if torch.device(device).type != "cuda":
        return False, "mamba-ssm's kernel runs on CUDA only"
    return True, "mamba-ssm selective_scan_cuda (benchmark adapter)"


def enable(ext=None) -> bool:
    """Registers the ``mamba_ssm`` backend (priority below every zoo backend, so ``auto`` never picks
    it). Returns False when mamba-ssm's extension is neither given, importable nor buildable."""
    global _ext
    if ext is None:
        from bench_scan import load_mamba  # same directory

        ext = load_mamba()
    if ext is None:
        return False
    _ext = ext
    from zoo.ops import register_backend

    register_backend(BACKEND, _probe, _scan, bidirectional=_bidirectional, priority=-100)
    return True
