"""Selective-scan ops: a pure-PyTorch reference that always works, and compiled kernels when built."""
from .reference import selective_scan_naive, selective_scan_reference
from .selective_scan import (
    BackendChoice,
    available_backends,
    last_backend,
    register_backend,
    resolve_backend,
    selective_scan,
    selective_scan_bidirectional,
    validate_scan_inputs,
)
from .multi_direction import (
    MSVMAMBA_LOW_RES_ORDERS,
    SCAN_ORDERS,
    last_multi_direction_backend,
    register_multi_direction_backend,
    resolve_multi_direction_backend,
    scan_order_index,
    selective_scan_multi_direction,
    unregister_multi_direction_backend,
)
from . import compiled  # noqa: E402  (registers the compiled backend; kernels build on first use)
from . import mixer  # noqa: E402  (the bimamba_* row-layout mixer ops)

__all__ = [
    "selective_scan",
    "selective_scan_bidirectional",
    "selective_scan_reference",
    "selective_scan_naive",
    "validate_scan_inputs",
    "register_backend",
    "resolve_backend",
    "available_backends",
    "last_backend",
    "BackendChoice",
    "selective_scan_multi_direction",
    "register_multi_direction_backend",
    "unregister_multi_direction_backend",
    "resolve_multi_direction_backend",
    "last_multi_direction_backend",
    "scan_order_index",
    "SCAN_ORDERS",
    "MSVMAMBA_LOW_RES_ORDERS",
]
