"""Backend choice shared by the scan dispatchers (single scan and multi-direction scan)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Protocol, Tuple

import torch


@dataclass(frozen=True)
class BackendChoice:
    """Which backend ran (or would run) and why."""

    name: str
    reason: str


class _Probed(Protocol):
    name: str
    priority: int
    probe: Callable[[torch.device], Tuple[bool, str]]  # cheap, never raises


def explicit_choice(backends: Mapping[str, _Probed], requested: str, device: torch.device, what: str) -> BackendChoice:
    """The backend asked for by name; raises rather than falling back when it cannot run."""
    ok, reason = backends[requested].probe(device)
    if not ok:
        raise RuntimeError(f"{what} backend {requested!r} cannot run on {device}: {reason}")
    return BackendChoice(requested, f"requested explicitly; {reason}")


def auto_choice(backends: Mapping[str, _Probed], device: torch.device) -> Tuple[Optional[BackendChoice], List[str]]:
    """The usable backend of highest priority (None if none is), and why each one before it was skipped."""
    skipped = []
    for b in sorted(backends.values(), key=lambda b: -b.priority):
        ok, reason = b.probe(device)
        if ok:
            return BackendChoice(b.name, with_skipped(reason, skipped)), skipped
        skipped.append(f"{b.name}: {reason}")
    return None, skipped


def with_skipped(reason: str, skipped: List[str]) -> str:
    return reason if not skipped else f"{reason} (skipped: {'; '.join(skipped)})"
