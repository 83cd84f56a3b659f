"""Multi-direction selective scan over a 2-D feature map (the MSVMamba low-resolution branch).

Token-wise inputs are given once, in the map's row-major pixel order. The listed traversal orders
(e.g. reversed row-major, column-major, reversed column-major) are treated as ONE sequence of length
``len(orders) * height * width``: the directions are visited one after another and the SSM state is
carried across the direction boundaries, exactly as if the reordered copies had been concatenated.
Each direction's output comes back already put back to row-major pixel order, so the caller can
normalise and sum them without knowing the traversal.

The reference implementation gathers the reordered copies and calls :func:`zoo.ops.selective_scan`
(so a compiled scan kernel already speeds it up). A kernel that reads the orders directly, with no
materialised copies, plugs in through :func:`register_multi_direction_backend`; callers do not change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ._dispatch import BackendChoice, auto_choice, explicit_choice, with_skipped
from .selective_scan import resolve_backend, selective_scan, validate_scan_inputs

__all__ = [
    "ROW_MAJOR",
    "ROW_MAJOR_REVERSED",
    "COLUMN_MAJOR",
    "COLUMN_MAJOR_REVERSED",
    "MSVMAMBA_LOW_RES_ORDERS",
    "SCAN_ORDERS",
    "scan_order_index",
    "scan_order_indices",
    "selective_scan_multi_direction",
    "selective_scan_multi_direction_reference",
    "register_multi_direction_backend",
    "unregister_multi_direction_backend",
    "resolve_multi_direction_backend",
    "last_multi_direction_backend",
]

ROW_MAJOR = "row"
ROW_MAJOR_REVERSED = "row_reversed"
COLUMN_MAJOR = "col"
COLUMN_MAJOR_REVERSED = "col_reversed"
SCAN_ORDERS = (ROW_MAJOR, ROW_MAJOR_REVERSED, COLUMN_MAJOR, COLUMN_MAJOR_REVERSED)
# the three low-resolution directions of MSVMamba, in the order the official code concatenates them
MSVMAMBA_LOW_RES_ORDERS = (ROW_MAJOR_REVERSED, COLUMN_MAJOR, COLUMN_MAJOR_REVERSED)

MULTI_DIRECTION_BACKEND_ENV = "ZOO_MULTI_DIRECTION_BACKEND"


_INDEX_CACHE: Dict[tuple, object] = {}
_INDEX_CACHE_SIZE = 256


def _memoised(key: tuple, build: Callable[[], object]) -> object:
    """Index tensors memoised for eager calls only.

    Under torch.compile / torch.export the builders run on fake or functional tensors; caching one of
    those made every later eager call return FakeTensors, so nothing made while tracing is stored.
    """
    if torch.compiler.is_compiling():
        return build()
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    with torch.inference_mode(False):  # a cached inference tensor could not be saved by autograd later
        value = build()
    parts = value if isinstance(value, tuple) else (value,)
    if all(type(t) is torch.Tensor for t in parts):  # FakeTensor / FunctionalTensor are subclasses
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        _INDEX_CACHE[key] = value
    return value


def _order_index_cpu(order: str, height: int, width: int) -> torch.Tensor:
    return _memoised(("order", order, height, width), lambda: _build_order_index(order, height, width))


def _build_order_index(order: str, height: int, width: int) -> torch.Tensor:
    row_major = torch.arange(height * width)
    if order == ROW_MAJOR:
        return row_major
    if order == ROW_MAJOR_REVERSED:
        return row_major.flip(0)
    column_major = row_major.view(height, width).t().reshape(-1)
    if order == COLUMN_MAJOR:
        return column_major
    if order == COLUMN_MAJOR_REVERSED:
        return column_major.flip(0)
    raise ValueError(f"unknown scan order {order!r}; accepted: {', '.join(repr(o) for o in SCAN_ORDERS)}")


def scan_order_index(order: str, height: int, width: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Row-major pixel index visited at each step of ``order`` (a permutation of ``range(h * w)``).

    ``tokens[..., scan_order_index(o, h, w)]`` lays row-major tokens out in traversal order ``o``.
    """
    return _order_index_cpu(order, int(height), int(width)).to(device)


def scan_order_indices(orders: Sequence[str], height: int, width: int,
                       device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """(len(orders), h * w): row ``k`` is :func:`scan_order_index` of ``orders[k]`` (memoised, eager calls)."""
    gather, _ = _gather_scatter_index(tuple(orders), int(height), int(width), torch.device(device))
    return gather.view(len(orders), -1)


def _validate_orders(orders: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(orders, str):
        raise TypeError(f"orders must be a sequence of order names, got the string {orders!r}; e.g. ({orders!r},)")
    orders = tuple(orders)
    if not orders:
        raise ValueError("orders must name at least one traversal order")
    bad = [o for o in orders if o not in SCAN_ORDERS]
    if bad:
        raise ValueError(f"unknown scan order(s) {bad}; accepted: {', '.join(repr(o) for o in SCAN_ORDERS)}")
    return orders


def _validate(u, delta, A, B, C, D, delta_bias, height, width, orders) -> Tuple[str, ...]:
    validate_scan_inputs(u, delta, A, B, C, D, None, delta_bias)
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}")
    if u.shape[-1] != height * width:
        raise ValueError(
            f"selective_scan_multi_direction: inputs have {u.shape[-1]} tokens but height x width = "
            f"{height} x {width} = {height * width}; tokens must be the map in row-major order"
        )
    return _validate_orders(orders)


def selective_scan_multi_direction_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    height: int,
    width: int,
    orders: Tuple[str, ...],
    delta_softplus: bool,
    scan_backend: Optional[str] = None,
) -> torch.Tensor:
    """Gathers each order's copy, scans the concatenation once, and scatters each part back."""
    L = height * width
    gather, scatter = _gather_scatter_index(orders, height, width, u.device)

    def along_time(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(-1, gather)

    B_seq = along_time(B) if B.dim() > 2 else B  # variable (batch, [groups,] N, L): reorder its steps
    C_seq = along_time(C) if C.dim() > 2 else C
    y = selective_scan(
        along_time(u), along_time(delta), A, B_seq, C_seq, D, None, delta_bias, delta_softplus,
        backend=scan_backend,
    )  # (batch, dim, n * L) in traversal order
    # (batch, dim, n * L) -> each direction's steps back on their pixels -> (batch, n, dim, L)
    y = y.index_select(-1, scatter).view(y.shape[0], y.shape[1], len(orders), L)
    return y.transpose(1, 2).contiguous()


def _gather_scatter_index(
    orders: Tuple[str, ...], height: int, width: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices into row-major tokens laying out all orders, and into the scan output undoing them."""
    return _memoised(("gather", orders, height, width, str(device)),
                     lambda: _build_gather_scatter(orders, height, width, device))


def _build_gather_scatter(
    orders: Tuple[str, ...], height: int, width: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    L = height * width
    perms = [_order_index_cpu(o, height, width) for o in orders]
    gather = torch.cat(perms)
    # output pixel p of direction k was step inverse_k[p] of that direction
    scatter = torch.cat([k * L + torch.argsort(perm) for k, perm in enumerate(perms)])
    return gather.to(device), scatter.to(device)


@dataclass
class _MultiDirectionBackend:
    name: str
    probe: Callable[[torch.device], Tuple[bool, str]]
    fn: Callable[..., torch.Tensor]
    priority: int = 0


_BACKENDS: Dict[str, _MultiDirectionBackend] = {}
_last_choice: Optional[BackendChoice] = None


def register_multi_direction_backend(
    name: str,
    probe: Callable[[torch.device], Tuple[bool, str]],
    fn: Callable[..., torch.Tensor],
    priority: int = 0,
) -> None:
    """Adds a multi-direction scan implementation (e.g. a kernel indexing the orders directly).

    ``probe(device) -> (usable, reason)`` must be cheap and must not raise. ``fn`` is called as
    ``fn(u, delta, A, B, C, D, delta_bias, height, width, orders, delta_softplus)`` with validated
    inputs and must return ``(batch, len(orders), dim, height * width)`` in u's dtype, each direction in
    row-major pixel order, with the SSM state carried from one direction into the next. ``auto``
    picks the usable backend of highest priority; the gather-based reference is the fallback.
    """
    if name == "reference":
        raise ValueError("'reference' is the built-in multi-direction backend and cannot be replaced")
    _BACKENDS[name] = _MultiDirectionBackend(name, probe, fn, priority)


def unregister_multi_direction_backend(name: str) -> None:
    """Removes a backend added with :func:`register_multi_direction_backend` (no-op if absent)."""
    _BACKENDS.pop(name, None)


def resolve_multi_direction_backend(
    device: Union[str, torch.device], backend: Optional[str] = None
) -> BackendChoice:
    """Which implementation :func:`selective_scan_multi_direction` uses on ``device``, and why.

    ``backend`` (or ``ZOO_MULTI_DIRECTION_BACKEND``) may name a multi-direction backend, or a plain
    selective-scan backend (``'reference'`` or a compiled one), in which case the gather-based
    reference runs on top of that scan backend. An explicit request that cannot be met raises.
    """
    device = torch.device(device)
    requested = backend or os.environ.get(MULTI_DIRECTION_BACKEND_ENV) or "auto"
    if requested in _BACKENDS:
        return explicit_choice(_BACKENDS, requested, device, "multi-direction")
    if requested != "auto":
        try:  # a plain scan backend: raises if unknown or unusable on this device
            scan_choice = resolve_backend(device, requested)
        except ValueError as err:
            extra = ", ".join(repr(n) for n in sorted(_BACKENDS))
            raise ValueError(f"{err}" + (f"; multi-direction backends: {extra}" if extra else "")) from None
        return BackendChoice(f"reference+{requested}", f"gather reference over the scan backend: {scan_choice.reason}")
    choice, skipped = auto_choice(_BACKENDS, device)
    if choice is not None:
        return choice
    return BackendChoice("reference", with_skipped("gathers reordered copies and runs zoo.ops.selective_scan", skipped))


def last_multi_direction_backend() -> Optional[BackendChoice]:
    """The implementation the most recent multi-direction call used; None before the first call."""
    return _last_choice


def selective_scan_multi_direction(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    *,
    height: int,
    width: int,
    orders: Sequence[str] = MSVMAMBA_LOW_RES_ORDERS,
    delta_softplus: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Scans the concatenation of several traversals of a ``height x width`` map as one sequence.

    Args:
        u, delta: (batch, dim, height * width), tokens in row-major pixel order.
        A: (dim, d_state). B, C: (batch, groups, d_state, height * width) or (batch, d_state,
            height * width) in row-major order, or (dim, d_state) fixed. D, delta_bias: optional (dim,). Same semantics as
            :func:`zoo.ops.selective_scan`.
        height, width: the map size.
        orders: traversal orders, names from ``SCAN_ORDERS`` ('row', 'row_reversed', 'col',
            'col_reversed'); scanned in this sequence, the state carried across the boundaries.
        backend: force an implementation (see :func:`resolve_multi_direction_backend`).

    Returns:
        (batch, len(orders), dim, height * width) in u's dtype; entry k is direction k's output with
        every token back on its row-major pixel.
    """
    height, width = int(height), int(width)
    orders = _validate(u, delta, A, B, C, D, delta_bias, height, width, orders)
    global _last_choice
    choice = resolve_multi_direction_backend(u.device, backend)
    _last_choice = choice
    if choice.name in _BACKENDS:
        return _BACKENDS[choice.name].fn(u, delta, A, B, C, D, delta_bias, height, width, orders, delta_softplus)
    scan_backend = choice.name.split("+", 1)[1] if "+" in choice.name else None
    return selective_scan_multi_direction_reference(
        u, delta, A, B, C, D, delta_bias, height, width, orders, delta_softplus, scan_backend
    )
