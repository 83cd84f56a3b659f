#!/usr/bin/env python
"""Train or evaluate any zoo / timm backbone on ImageNet (ImageFolder layout) or the embedded digits set.

    python train_imagenet.py                                   # embedded default: tiny Vim on digits, CPU ok
    python train_imagenet.py -c configs/vim_tiny.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node 8 train_imagenet.py -c configs/msvmamba_tiny.yaml --data-dir /data/imagenet
    python train_imagenet.py -c configs/vim_tiny.yaml --data-dir /data/imagenet --eval --finetune vim_t.pth

Every config key is also a flag (``--lr 5e-4``, ``--no-ema``); see ``--help`` and docs/training.md.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

# OpenMP threads that spin while waiting for a descheduled sibling slow a busy machine's training many
# times over (docs/training.md); set before torch loads its OpenMP runtime, and a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from zoo.train import TrainingError, config_from_args, run  # noqa: E402
from zoo.train.distributed import cleanup  # noqa: E402


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the script; a bad value, path or file, a full disk or a diverged loss ends it with one line on
    stderr and exit code 2 (no traceback)."""
    try:
        cfg = config_from_args(argv)
        run(cfg)
    except (TrainingError, FileNotFoundError) as err:
        print(f"train_imagenet.py: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
