#!/usr/bin/env python
"""Train or evaluate any zoo / timm backbone on ImageNet (ImageFolder layout) or the embedded digits set.

    python train_imagenet.py                                   # embedded default: tiny Vim on digits, CPU ok
    python train_imagenet.py -c configs/vim_tiny.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node 8 train_imagenet.py -c configs/msvmamba_tiny.yaml --data-dir /data/imagenet
    python train_imagenet.py -c configs/vim_tiny.yaml --data-dir /data/imagenet --eval --finetune vim_t.pth

Every config key is also a flag (``--lr 5e-4``, ``--no-ema``); see ``--help`` and docs/training.md.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from zoo.train import ConfigError, config_from_args, run
from zoo.train.distributed import cleanup


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = config_from_args(argv)
        run(cfg)
    except (ConfigError, FileNotFoundError) as err:  # bad values or paths: the message says what, no traceback
        print(f"train_imagenet.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
