"""The compiled selective-scan backend: ``torch.ops.zoo_scan`` ops, their autograd and fake kernels.

Layering: the kernels in ``csrc/`` implement the ops below for CPU and CUDA; this module defines the
op schemas (so ``torch.compile(fullgraph=True)`` and ``torch.export`` see single ops with fake
implementations for shape propagation), wires their gradients with ``torch.library.register_autograd``
(so reentrant and non-reentrant activation checkpointing work), and registers the ``compiled``
backend with :mod:`zoo.ops.selective_scan`. The libraries are built on first use (see ``_build``).

Ops (inputs in the original time order everywhere):

* ``zoo_scan::scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, reverse) -> (out, last_state)``
* ``zoo_scan::scan_bwd(dout, dlast?, <scan_fwd inputs>) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``
  (absent optional inputs get an empty gradient)
* ``zoo_scan::bidir_fwd`` / ``bidir_bwd``: the fused two-direction scan of Vim (CUDA).

The backward passes are deterministic: no atomics; reductions over batch and channels run in a
fixed order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _build
from .selective_scan import register_backend

__all__ = ["scan_op", "bidirectional_op", "kernels_available", "multi_direction_op", "register_direct_multi_direction"]

_lib = torch.library.Library("zoo_scan", "DEF")
_lib.define(
    "scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, bool reverse) -> (Tensor, Tensor)"
)
_lib.define(
    "scan_bwd(Tensor dout, Tensor? dlast, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? z, Tensor? delta_bias, bool delta_softplus, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor)"
)
_BIDIR_INPUTS = (
    "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
    "Tensor u_rev, Tensor delta_rev, Tensor A_rev, Tensor B_rev, Tensor C_rev, Tensor? D_rev, "
    "Tensor? delta_bias_rev, Tensor? z, bool delta_softplus, float scale"
)
_lib.define(f"bidir_fwd({_BIDIR_INPUTS}) -> Tensor")
# visiting order given by `index` (positions into the L-long inputs, may repeat); CPU kernel
_lib.define(
    "scan_fwd_indexed(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
    "Tensor index, bool delta_softplus) -> (Tensor, Tensor)"
)
_lib.define(
    "scan_bwd_indexed(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? delta_bias, Tensor index, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)"
)
_lib.define(f"bidir_bwd(Tensor dout, {_BIDIR_INPUTS}) -> Tensor[]")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grad_like(x: Optional[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    if x is None:
        return u.new_empty((0,), dtype=_acc_dtype(u))
    return x.new_empty(x.shape)


# ---- fake (meta) implementations: shapes and dtypes only ----


@torch.library.register_fake("zoo_scan::scan_fwd")
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=_acc_dtype(u))


@torch.library.register_fake("zoo_scan::scan_bwd")
def _scan_bwd_fake(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return (
        u.new_empty(u.shape),
        u.new_empty(u.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        _grad_like(D, u),
        u.new_empty(u.shape) if z is not None else u.new_empty((0,), dtype=_acc_dtype(u)),
        _grad_like(delta_bias, u),
    )


@torch.library.register_fake("zoo_scan::bidir_fwd")
def _bidir_fwd_fake(u, *args):
    return u.new_empty(u.shape)


@torch.library.register_fake("zoo_scan::bidir_bwd")
def _bidir_bwd_fake(dout, u, delta, A, B, C, D, bias, u_r, delta_r, A_r, B_r, C_r, D_r, bias_r, z, sp, scale):
    grads = [u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape), B.new_empty(B.shape),
             C.new_empty(C.shape), _grad_like(D, u), _grad_like(bias, u),
             u.new_empty(u.shape), u.new_empty(u.shape), A_r.new_empty(A_r.shape), B_r.new_empty(B_r.shape),
             C_r.new_empty(C_r.shape), _grad_like(D_r, u), _grad_like(bias_r, u)]
    grads.append(u.new_empty(u.shape) if z is not None else u.new_empty((0,), dtype=_acc_dtype(u)))
    return grads


@torch.library.register_fake("zoo_scan::scan_fwd_indexed")
def _scan_fwd_indexed_fake(u, delta, A, B, C, D, delta_bias, index, delta_softplus):
    return (u.new_empty((u.shape[0], u.shape[1], index.shape[0])),
            u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=_acc_dtype(u)))


@torch.library.register_fake("zoo_scan::scan_bwd_indexed")
def _scan_bwd_indexed_fake(dout, u, delta, A, B, C, D, delta_bias, index, delta_softplus):
    return (u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), _grad_like(D, u), _grad_like(delta_bias, u))


# ---- autograd ----


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse


def _maybe(g: torch.Tensor, present: bool, like: Optional[torch.Tensor]):
    return g.to(like.dtype) if present else None


def _scan_backward(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.zoo_scan.scan_bwd(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.reverse
    )
    return (du, ddelta.to(delta.dtype), dA, dB, dC, _maybe(dD, D is not None, D),
            _maybe(dz, z is not None, z), _maybe(dbias, delta_bias is not None, delta_bias), None, None)


torch.library.register_autograd("zoo_scan::scan_fwd", _scan_backward, setup_context=_scan_setup)


def _indexed_setup(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, index, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, index)
    ctx.delta_softplus = delta_softplus


def _indexed_backward(ctx, dout, dlast):
    u, delta, A, B, C, D, delta_bias, index = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(u.shape[0], u.shape[1], index.shape[0], dtype=u.dtype, device=u.device)
    du, ddelta, dA, dB, dC, dD, dbias = torch.ops.zoo_scan.scan_bwd_indexed(
        dout, u, delta, A, B, C, D, delta_bias, index, ctx.delta_softplus
    )
    return (du, ddelta.to(delta.dtype), dA, dB, dC, _maybe(dD, D is not None, D),
            _maybe(dbias, delta_bias is not None, delta_bias), None, None)


torch.library.register_autograd("zoo_scan::scan_fwd_indexed", _indexed_backward, setup_context=_indexed_setup)


def _bidir_setup(ctx, inputs, output):
    *tensors, delta_softplus, scale = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus, ctx.scale = delta_softplus, scale


def _bidir_backward(ctx, dout):
    saved = ctx.saved_tensors
    grads = torch.ops.zoo_scan.bidir_bwd(dout, *saved, ctx.delta_softplus, ctx.scale)
    out = []
    # inputs: u, delta, A, B, C, D, bias, u_r, delta_r, A_r, B_r, C_r, D_r, bias_r, z
    for g, x in zip(grads, saved):
        out.append(None if x is None else g.to(x.dtype))
    return (*out, None, None)


torch.library.register_autograd("zoo_scan::bidir_fwd", _bidir_backward, setup_context=_bidir_setup)


# ---- the zoo.ops backend ----


def kernels_available(device) -> Tuple[bool, str]:
    """Whether the compiled kernels can run on ``device`` (builds them on first call)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False, f"no compiled kernels for device type {device.type!r}"
    return _build.ensure_loaded(device.type)


def scan_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
            reverse=False):
    """``zoo.ops.selective_scan`` through ``torch.ops.zoo_scan.scan_fwd`` (inputs already validated)."""
    if u.is_cuda and u.dtype == torch.float64:
        # the CUDA kernels take fp32/fp16/bf16; float64 on a GPU is a testing case, served exactly
        from .reference import selective_scan_reference

        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                        reverse=reverse)
    out, last = torch.ops.zoo_scan.scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    return (out, last) if return_last_state else out


def bidirectional_op(u, delta, A, B, C, D, delta_bias, u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev,
                     delta_bias_rev, z=None, delta_softplus=True, scale=0.5):
    """Vim's two-direction scan: one fused launch on CUDA, two compiled scans elsewhere."""
    if u.is_cuda and u.dtype != torch.float64:
        return torch.ops.zoo_scan.bidir_fwd(u, delta, A, B, C, D, delta_bias, u_rev, delta_rev, A_rev, B_rev,
                                            C_rev, D_rev, delta_bias_rev, z, delta_softplus, float(scale))
    y = scan_op(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    y_rev = scan_op(u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev, None, delta_bias_rev, delta_softplus,
                    reverse=True)
    out = (y + y_rev) * scale
    if z is not None:
        out = out * torch.nn.functional.silu(z.to(out.dtype))
    return out


register_backend("compiled", kernels_available, scan_op, bidirectional=bidirectional_op, priority=10)


# ---- MSVMamba's multi-direction scan, reading the map in each order directly (CPU kernel) ----


def _multi_direction_probe(device) -> Tuple[bool, str]:
    from .selective_scan import resolve_backend

    device = torch.device(device)
    if device.type != "cpu":
        return False, "the direct-indexing kernel exists for CPU only (CUDA uses the gather path + CUDA scan)"
    try:
        scan_choice = resolve_backend(device).name
    except (ValueError, RuntimeError) as e:  # e.g. a bad ZOO_SCAN_BACKEND: the gather path reports it
        return False, str(e)
    if scan_choice != "compiled":  # follow the single-scan choice (reference forced, a test backend...)
        return False, f"the selective-scan backend in use is {scan_choice!r}, not 'compiled'"
    return kernels_available(device)


def multi_direction_op(u, delta, A, B, C, D, delta_bias, height, width, orders, delta_softplus):
    """``selective_scan_multi_direction`` without reordered copies of u / delta / B / C: the kernel
    visits the row-major inputs through one index of length ``len(orders) * height * width``."""
    from .multi_direction import _gather_scatter_index

    L = height * width
    # step k * L + j of the traversal is pixel perms[k][j] of direction k; `back` puts each output on its pixel
    index, back = _gather_scatter_index(tuple(orders), height, width, torch.device("cpu"))
    y, _ = torch.ops.zoo_scan.scan_fwd_indexed(u, delta, A, B, C, D, delta_bias, index, delta_softplus)
    y = y.index_select(-1, back.to(y.device)).view(y.shape[0], y.shape[1], len(orders), L)
    return y.transpose(1, 2).contiguous()


MULTI_DIRECTION_BACKEND_NAME = "compiled_direct"


def register_direct_multi_direction(priority: int = 1) -> None:
    """Opt in: makes the direct-indexing CPU kernel a multi-direction backend (``compiled_direct``).

    Not registered by default while tests/test_msvmamba.py assumes that no other multi-direction
    backend exists (see docs/kernels.md); once registered, ``auto`` uses it on CPU whenever the
    selective-scan backend in use is ``compiled``.
    """
    from .multi_direction import register_multi_direction_backend

    register_multi_direction_backend(MULTI_DIRECTION_BACKEND_NAME, _multi_direction_probe, multi_direction_op,
                                     priority=priority)
