"""Where the official-code parity fixtures live, and what a checkout without them does.

A developer checkout without ``../shared`` skips the parity tests. CI sets ``ZOO_REQUIRE_PARITY=1``
(``.ci/run``), and then a missing or empty fixture folder is an error at collection time, so the
parity tests can never pass by silently not running.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

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


def fixture_id(path: Path) -> str:
    """pytest id of a fixture or manifest file: its name without the suffix."""
    return path.stem


def load_fixture(sidecar: Path) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(sidecar JSON, every tensor of the .safetensors next to it, the official state dict stored in it
    under ``state_dict.``)."""
    from safetensors.torch import load_file

    meta = json.loads(sidecar.read_text())
    tensors = load_file(str(sidecar.with_suffix(".safetensors")))
    official_sd = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return meta, tensors, official_sd


class FakeCfgNode(dict):
    """Stands in for the yacs CfgNode that official VMamba-codebase checkpoints pickle (a dict subclass
    that ``torch.load(weights_only=True)`` refuses)."""
