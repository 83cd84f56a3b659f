"""Training checkpoints (atomic, weights_only-loadable) and fine-tuning from zoo/official weights.

A training checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``; nothing is ever unpickled as an arbitrary object.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError, TrainingError


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (the message names the file and the reason)."""

__all__ = [
    "atomic_save",
    "load_training_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "load_finetune_weights",
    "weights_source",
    "has_ema_weights",
    "CheckpointWriteError",
]


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact: readers see the old file or the new one.
    A write that fails (a full disk, a lost mount) raises :class:`CheckpointWriteError` saying so.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.is_file() else "no earlier checkpoint exists"
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise CheckpointWriteError(f"could not write checkpoint {path}: {reason} ({kept}); free space or "
                                   "point --output elsewhere, then --resume") from err
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. an unsaveable object: no stray partial file
        raise


def load_training_checkpoint(path: str | Path, need_training_state: bool = True) -> Dict[str, Any]:
    """Loads a checkpoint written by this trainer (tensors and plain values only).

    ``need_training_state``: the file must hold what ``--resume`` restores (optimizer, scheduler, epoch),
    which ``best.pth`` (weights and metrics only) does not.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torn, truncated or foreign files fail in many ways
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read checkpoint {path}: {first}") from err
    if not isinstance(ckpt, dict) or ("model" not in ckpt and "shards" not in ckpt):
        raise ConfigError(
            f"{path} is not a zoo training checkpoint (no 'model' entry); "
            "to start from plain or official weights use --finetune instead of --resume"
        )
    missing = [k for k in ("optimizer", "scheduler", "epoch", "global_step") if k not in ckpt]
    if need_training_state and missing:
        raise ConfigError(
            f"{path} holds weights only (no {', '.join(missing)} state; best.pth is such a file), so a run "
            f"cannot be resumed from it; resume from the run's last.pth, or start a new run from these "
            f"weights with --finetune {path}"
        )
    return ckpt


def weights_source(ckpt: Dict[str, Any], path: str | Path):
    """The tensors of a training checkpoint (``model.*``, ``model_ema.*``, ``optimizer.<i>.<name>``) as one
    source that :func:`zoo.train.fsdp.load_module` reads, whether the run that wrote it was sharded or not."""
    from .fsdp import FullSource, ShardedSource, training_tensors

    if "shards" in ckpt:
        shards = ckpt["shards"]
        return ShardedSource(Path(path).parent / shards["folder"], int(shards["world_size"]))
    modules = {name: ckpt[name] for name in ("model", "model_ema") if ckpt.get(name) is not None}
    optimizer = ckpt["optimizer"] if isinstance(ckpt.get("optimizer"), dict) else None
    return FullSource(training_tensors(modules, optimizer)[1])


def has_ema_weights(source) -> bool:
    return any(k.startswith("model_ema.") for k in source.keys())


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) generator states as tensors/plain values."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _unwrap_state_dict(obj: Dict[str, Any], prefer_ema: bool) -> Dict[str, torch.Tensor]:
    keys = ("model_ema", "state_dict_ema", "model", "state_dict", "module") if prefer_ema else (
        "model", "state_dict", "module", "model_ema", "state_dict_ema")
    for key in keys:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # weights saved from DDP or torch.compile wrappers
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _resize_pos_embed(state: Dict[str, torch.Tensor], model: nn.Module) -> List[str]:
    """Resamples absolute position embeddings whose grid differs from the model's (2-D bicubic)."""
    from timm.layers import resample_abs_pos_embed

    resized = []
    own = model.state_dict()
    for key, value in list(state.items()):
        if "pos_embed" not in key or key not in own or own[key].shape == value.shape:
            continue
        target = own[key]
        if value.ndim != 3 or target.ndim != 3:
            continue
        prefix = getattr(model, "num_prefix_tokens", 0) or 0
        if getattr(model, "no_embed_class", False):
            prefix = 0
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            side = int(round((target.shape[1] - prefix) ** 0.5))
            grid = (side, side)
        state[key] = resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix, verbose=False)
        resized.append(key)
    return resized


def load_finetune_weights(model: nn.Module, path: str | Path, prefer_ema: bool = False) -> Dict[str, Any]:
    """Loads zoo or official weights for fine-tuning.

    The file is read by ``zoo.checkpoint.load_checkpoint_file`` (safetensors or weights-only torch
    files), converted by the model module's ``checkpoint_filter_fn`` when it has one (official key layouts,
    position-embedding resizing), any remaining position-embedding mismatch is resampled, and classifier
    weights whose shape no longer fits (a different number of classes) are dropped.
    Returns a report with the missing / unexpected / dropped keys.
    """
    try:
        from zoo.checkpoint import load_checkpoint_file
    except ImportError as err:
        raise ImportError(
            "fine-tuning needs zoo.checkpoint.load_checkpoint_file, which is not available in this install"
        ) from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--finetune checkpoint not found: {path}")
    raw = load_checkpoint_file(str(path))
    if isinstance(raw, dict) and "shards" in raw:  # a sharded (FSDP) run's last.pth: assemble whole tensors
        from .fsdp import whole_tensors

        source = weights_source(raw, path)
        prefix = "model_ema." if prefer_ema and has_ema_weights(source) else "model."
        raw = whole_tensors(source, prefix)
    state = _unwrap_state_dict(raw, prefer_ema) if isinstance(raw, dict) else raw
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    resized = _resize_pos_embed(state, model)
    own = model.state_dict()
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in dropped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_like = ("head", "fc", "classifier")
    bad_missing = [k for k in missing if not any(h in k for h in head_like)]
    if len(bad_missing) > 0.5 * max(len(own), 1):
        raise ConfigError(
            f"{path} does not fit model {type(model).__name__}: {len(bad_missing)} of {len(own)} weights are "
            f"missing (first: {bad_missing[:5]}); check the model name"
        )
    return {"missing": list(missing), "unexpected": list(unexpected), "dropped": dropped, "resized": resized}


def split_rng_for_rank(rng_states: Optional[List[Dict[str, Any]]], rank: int, world_size: int
                       ) -> Tuple[Optional[Dict[str, Any]], str]:
    """Picks this rank's saved RNG state; a different world size cannot continue the same streams."""
    if not rng_states:
        return None, "checkpoint has no RNG state"
    if len(rng_states) != world_size:
        return None, (f"checkpoint was written by {len(rng_states)} processes, this run has {world_size}: "
                      "random streams restart from the seed")
    return rng_states[rank], ""
