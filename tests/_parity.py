"""Where the official-code parity fixtures live, and what a checkout without them does.

A developer checkout without ``../shared`` skips the parity tests. CI sets ``ZOO_REQUIRE_PARITY=1``
(``.ci/run``), and then a missing or empty fixture folder is an error at collection time, so the
parity tests can never pass by silently not running.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional

REQUIRE_ENV = "ZOO_REQUIRE_PARITY"
SHARED_PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def parity_dir(family: str) -> Path:
    return SHARED_PARITY / family


def parity_files(family: str, pattern: str, keep: Optional[Callable[[Path], bool]] = None) -> List[Path]:
    """The files of ``family``'s fixture folder matching ``pattern`` (sorted); [] when absent, unless required."""
    folder = parity_dir(family)
    files = sorted(p for p in folder.glob(pattern) if keep is None or keep(p)) if folder.is_dir() else []
    if not files and os.environ.get(REQUIRE_ENV) == "1":
        raise RuntimeError(
            f"{REQUIRE_ENV}=1 but no {pattern!r} parity files for {family!r} in {folder}: "
            "CI must run with the official fixtures at ../shared/parity"
        )
    return files
