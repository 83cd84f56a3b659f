"""Public selective-scan API and backend dispatch.

Callers use :func:`selective_scan` / :func:`selective_scan_bidirectional` and never name a backend;
compiled backends (``zoo.ops`` kernels from ``csrc/``) register themselves with
:func:`register_backend` and are picked automatically when they can serve the inputs.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ._dispatch import BackendChoice, auto_choice, explicit_choice
from .reference import selective_scan_reference

__all__ = [
    "selective_scan",
    "selective_scan_bidirectional",
    "register_backend",
    "resolve_backend",
    "last_backend",
    "available_backends",
    "BackendChoice",
]

BACKEND_ENV = "ZOO_SCAN_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class _Backend:
    name: str
    # (device) -> (usable, reason); must be cheap and must not raise
    probe: Callable[[torch.device], Tuple[bool, str]]
    scan: Callable[..., object]
    bidirectional: Optional[Callable[..., object]] = None
    priority: int = 0


def _probe_reference(device: torch.device) -> Tuple[bool, str]:
    return True, "pure PyTorch, runs on every device"


_BACKENDS: Dict[str, _Backend] = {
    "reference": _Backend("reference", _probe_reference, selective_scan_reference, priority=-1),
}
_last_choice: Optional[BackendChoice] = None
_warned_slow_cuda = False


def register_backend(
    name: str,
    probe: Callable[[torch.device], Tuple[bool, str]],
    scan: Callable[..., object],
    bidirectional: Optional[Callable[..., object]] = None,
    priority: int = 0,
) -> None:
    """Adds a backend. ``auto`` picks the usable backend of highest priority."""
    _BACKENDS[name] = _Backend(name, probe, scan, bidirectional, priority)


def available_backends(device: Union[str, torch.device] = "cpu") -> Dict[str, BackendChoice]:
    """Every registered backend with whether it can run on ``device`` and why (or why not)."""
    device = torch.device(device)
    out = {}
    for name, b in _BACKENDS.items():
        ok, reason = b.probe(device)
        out[name] = BackendChoice(name if ok else f"{name} (unavailable)", reason)
    return out


def resolve_backend(device: Union[str, torch.device], backend: Optional[str] = None) -> BackendChoice:
    """The backend that :func:`selective_scan` uses for tensors on ``device``.

    ``backend`` (or the ``ZOO_SCAN_BACKEND`` environment variable) forces one by name; an explicit
    request that cannot be met raises instead of silently falling back.
    """
    device = torch.device(device)
    requested = backend or os.environ.get(BACKEND_ENV) or "auto"
    if requested != "auto" and requested not in _BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {requested!r}; accepted: 'auto', "
            + ", ".join(repr(n) for n in sorted(_BACKENDS))
        )
    if torch.onnx.is_in_onnx_export():
        return _onnx_export_choice()
    if requested != "auto":
        return explicit_choice(_BACKENDS, requested, device, "selective-scan")
    choice, _ = auto_choice(_BACKENDS, device)
    assert choice is not None, "the reference backend is always usable"
    return choice


def _onnx_export_choice() -> BackendChoice:
    """During ``torch.onnx.export`` the reference scan runs: it is plain torch ops, which ONNX can
    express, while the compiled ``zoo_scan`` ops have no ONNX translation."""
    if torch.jit.is_tracing():  # the legacy TorchScript exporter (dynamo=False)
        raise RuntimeError(
            "zoo models export to ONNX with the dynamo exporter only: call torch.onnx.export(model, (x,), "
            "dynamo=True); the legacy TorchScript exporter (dynamo=False) is not supported"
        )
    return BackendChoice("reference", "ONNX export: the reference scan exports as plain ONNX ops")


def last_backend() -> Optional[BackendChoice]:
    """The backend the most recent scan call used, with the reason; None before the first call."""
    return _last_choice


def _warn_if_slow(choice: BackendChoice, device: torch.device) -> None:
    global _warned_slow_cuda
    # the compiled backend's loader already warns once when it cannot build; this covers the rest
    # (e.g. ZOO_SCAN_BACKEND=reference or a CUDA device without any compiled backend registered)
    if "compiled: " in choice.reason:
        return
    if device.type == "cuda" and choice.name == "reference" and not _warned_slow_cuda:
        _warned_slow_cuda = True
        warnings.warn(
            "zoo.ops.selective_scan is running the pure-PyTorch reference on CUDA tensors, which is many "
            f"times slower than the compiled kernel ({choice.reason}). Install a CUDA toolkit (nvcc) and "
            "ninja matching your torch build so the kernels in csrc/ can be built, or build them ahead of "
            "time with `ZOO_BUILD_EXT=1 pip install -e .`; see docs/kernels.md.",
            RuntimeWarning,
            stacklevel=3,
        )


def _choose(device: torch.device, backend: Optional[str]) -> _Backend:
    global _last_choice
    choice = resolve_backend(device, backend)
    _last_choice = choice
    _warn_if_slow(choice, device)
    return _BACKENDS[choice.name]


def _check(name: str, t: Optional[torch.Tensor], shape: Tuple[int, ...], what: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {what} = {shape}")


def _check_dtype(name: str, t: Optional[torch.Tensor]) -> None:
    # integer inputs would be truncated and complex ones lose their imaginary part: neither is meant
    if t is not None and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"selective_scan: {name} has dtype {t.dtype}; accepted: float32, float16, bfloat16, float64"
            + (" (the scan is real-valued)" if t.is_complex() else "")
        )


def _check_state_operand(name: str, M, batch: int, dim: int, n: int, L: int) -> None:
    """B or C: fixed (dim, N), one group (batch, N, L) as mamba-ssm takes it, or (batch, groups, N, L)."""
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"selective_scan: {name} must be a tensor, got {type(M).__name__}")
    if M.dim() == 2:
        _check(name, M, (dim, n), "(dim, d_state)")
    elif M.dim() == 3:
        _check(name, M, (batch, n, L), "(batch, d_state, L)")
    elif M.dim() == 4:
        g = M.shape[1]
        if g < 1 or dim % g != 0:
            raise ValueError(f"selective_scan: {name} has {g} groups, which must divide dim = {dim}")
        _check(name, M, (batch, g, n, L), "(batch, groups, d_state, L)")
    else:
        raise ValueError(
            f"selective_scan: {name} must be (dim, d_state), (batch, d_state, L) or (batch, groups, d_state, L), "
            f"got shape {tuple(M.shape)}"
        )


def _groups_of(M: torch.Tensor) -> int:
    """Groups of a variable B/C (a 3-D one is one group); 0 for a fixed one."""
    return 1 if M.dim() == 3 else (M.shape[1] if M.dim() == 4 else 0)


def validate_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raises a clear error for shapes, dtypes or devices the scan does not accept."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(
            "selective_scan: u must be a (batch, dim, L) tensor, got "
            + (f"shape {tuple(u.shape)}" if isinstance(u, torch.Tensor) else type(u).__name__)
        )
    batch, dim, L = u.shape
    if L < 1:
        raise ValueError("selective_scan: the sequence length L must be >= 1")
    _check_dtype("u", u)
    _check("delta", delta, (batch, dim, L), "(batch, dim, L)")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, d_state) = ({dim}, N), got {getattr(A, 'shape', A)}")
    if A.is_complex():
        raise TypeError("selective_scan: complex A is not supported; A must be real")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        _check_state_operand(name, M, batch, dim, n, L)
    gB, gC = _groups_of(B), _groups_of(C)
    if gB and gC and gB != gC:
        raise ValueError(f"selective_scan: B and C must have the same groups, got {gB} and {gC}")
    _check("D", D, (dim,), "(dim,)")
    _check("z", z, (batch, dim, L), "(batch, dim, L)")
    _check("delta_bias", delta_bias, (dim,), "(dim,)")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        _check_dtype(name, t)
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")


def selective_scan(
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
    *,
    reverse: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The Mamba selective scan (same semantics as mamba-ssm's ``selective_scan_fn``).

    Args:
        u, delta: (batch, dim, L).
        A: (dim, d_state), real (fp32 recommended).
        B, C: (dim, d_state) fixed, or input-dependent (batch, groups, d_state, L) with groups dividing
            dim, or (batch, d_state, L) meaning one group (mamba-ssm's 3-D form; its gradient stays 3-D).
        D: optional (dim,) skip connection. z: optional (batch, dim, L) gate, output times silu(z).
        delta_bias: optional (dim,) added to delta; delta_softplus: apply softplus to delta.
        return_last_state: also return the final state (batch, dim, d_state) in fp32.
        reverse: scan from the last time step to the first.
        backend: force a backend by name ('reference', or a compiled one); default: best available.

    Returns:
        out (batch, dim, L) in u's dtype, and the last state when ``return_last_state``.
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    impl = _choose(u.device, backend)
    return impl.scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse=reverse
    )


def selective_scan_bidirectional(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    u_rev: torch.Tensor,
    delta_rev: torch.Tensor,
    A_rev: torch.Tensor,
    B_rev: torch.Tensor,
    C_rev: torch.Tensor,
    D_rev: Optional[torch.Tensor],
    delta_bias_rev: Optional[torch.Tensor],
    z: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    scale: float = 0.5,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Vim's two-direction scan: ``scale * (scan(fwd) + reverse_scan(rev)) * silu(z)``.

    Both directions take their inputs in the original time order; the ``*_rev`` direction has its own
    parameters and is scanned from t = L - 1 down to 0, so no flipped copies are needed by callers.
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    validate_scan_inputs(u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev, z, delta_bias_rev)
    impl = _choose(u.device, backend)
    if impl.bidirectional is not None:
        return impl.bidirectional(
            u, delta, A, B, C, D, delta_bias, u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev, delta_bias_rev,
            z, delta_softplus, scale,
        )
    y = impl.scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus, False, reverse=False)
    y_rev = impl.scan(u_rev, delta_rev, A_rev, B_rev, C_rev, D_rev, None, delta_bias_rev, delta_softplus, False,
                      reverse=True)
    out = (y + y_rev) * scale
    if z is not None:
        out = out * torch.nn.functional.silu(z.to(out.dtype))
    return out
