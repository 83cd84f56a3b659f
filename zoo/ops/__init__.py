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
from . import compiled  # noqa: E402  (registers the compiled backend; kernels build on first use)

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
]
