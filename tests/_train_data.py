"""Tiny data and settings shared by the training tests (import as ``from _train_data import ...``)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tiny_images(seed: int = 0) -> Dict[str, List[tuple]]:
    """3 classes of 20 px RGB images (a bright bar at a class-specific place, plus noise):
    16 train and 4 val per class, as ``{split: [(uint8 HxWx3 array, label), ...]}``."""
    rng = np.random.RandomState(seed)
    out: Dict[str, List[tuple]] = {}
    for split, per_class in (("train", 16), ("val", 4)):
        items = []
        for c in range(3):
            for _ in range(per_class):
                img = rng.randint(0, 80, (20, 20, 3)).astype(np.uint8)
                img[:, 6 * c: 6 * c + 6, c] = 230
                items.append((img, c))
        out[split] = items
    return out


def write_imagefolder(root: Path, seed: int = 0) -> Path:
    """The :func:`tiny_images` set as an ImageFolder tree ``root/{train,val}/class_<c>/<i>.png``."""
    for split, items in tiny_images(seed).items():
        for i, (img, c) in enumerate(items):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


def tiny_run_config(data_dir: Path, out: Path, experiment, **overrides) -> dict:
    """Config values for a 2-epoch test_vim run on the tiny set (6 steps of batch 8 per epoch)."""
    values = dict(
        model="test_vim", img_size=16, data_dir=str(data_dir), output=str(out), experiment=experiment,
        epochs=2, global_batch_size=8, lr=2e-3, warmup_epochs=0.5, min_lr=1e-5, weight_decay=0.05,
        workers=0, amp="none", progress=False, seed=7, ema=True, ema_decay=0.9,
    )
    values.update(overrides)
    return values


def as_flags(values: dict) -> List[str]:
    """Config values as train_imagenet.py flags."""
    flags: List[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is None:
            flags += [flag, "null"]
        else:
            flags += [flag, json.dumps(value) if not isinstance(value, str) else value]
    return flags


# run(config json in argv[1]) that SIGKILLs its own process once global step argv[2] is done
KILL_SCRIPT = """
import json, os, signal, sys
from zoo.train import make_config, run
kill_at = int(sys.argv[2])
def hook(info):
    if info["global_step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
run(make_config(json.loads(sys.argv[1])), on_step=hook)
"""


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "train_imagenet.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


PYTHON = sys.executable
