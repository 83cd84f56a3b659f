"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for backbones too large to replicate, and sharded checkpoints.

Sharding: every child of a ``blocks`` / ``layers`` container (the repeated blocks of ViT, Vim, ConvNeXt, ViTamin,
MambaVision, ...) is one FSDP unit, the model itself is the root unit holding the stem, norms and head. Parameters
stay fp32 and bf16 comes from autocast, exactly as under DDP, so an FSDP run computes what a DDP run computes.

Checkpoints of a sharded run: every process writes its own rows of each tensor into
``last.shards-step<N>-<id>/rank<r>-of-<W>.pth`` (tensors and plain values only, read back with
``torch.load(weights_only=True, mmap=True)``), and rank 0 writes ``last.pth`` with the rest of the training state
and the folder's name. ``last.pth`` is replaced only after every shard is on disk, so a kill at any point leaves
the previous checkpoint whole. Reading needs no knowledge of the writer's world size: a tensor's rows are taken
from whichever files hold them, so a run resumes on any number of processes, sharded or not, and a DDP checkpoint
resumes under FSDP. (torch.distributed.checkpoint does the same resharding, but its metadata file is a pickle,
which this trainer never loads.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError

__all__ = ["fsdp_units", "shard_model", "is_sharded", "local_rows", "FullSource", "ShardedSource",
           "split_optimizer_state", "training_tensors", "whole_tensors", "load_module", "load_optimizer",
           "save_shards", "full_state_dict", "all_finite"]

SHARD_CONTAINERS = ("blocks", "layers")


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks (children of every ``blocks`` / ``layers`` ModuleList or Sequential) that hold
    parameters, outermost first."""
    units = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in SHARD_CONTAINERS and isinstance(module, (nn.ModuleList, nn.Sequential)):
            units.extend(child for child in module.children() if next(child.parameters(), None) is not None)
    return units


def shard_model(model: nn.Module) -> nn.Module:
    """Applies ``fully_shard`` to each block, innermost first, then to the model (in place; returns it)."""
    from torch.distributed.fsdp import fully_shard

    for unit in reversed(fsdp_units(model)):
        fully_shard(unit)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: torch.Tensor) -> Tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 this process holds: all of them for a plain tensor."""
    if t.ndim == 0:
        return 0, 1
    if not _is_dtensor(t):
        return 0, t.shape[0]
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ConfigError(f"sharded checkpoints support FSDP's row sharding on one mesh dimension only, got "
                          f"placements {t.placements} on a {t.device_mesh.ndim}-D mesh")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


class FullSource:
    """Whole tensors (a checkpoint written by an unsharded run) behind the same interface as the shards."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[key]
        return t if t.ndim == 0 else t[start:stop]


class ShardedSource:
    """The shard files of one sharded checkpoint; :meth:`rows` assembles any row range from them."""

    def __init__(self, folder: Path, world_size: int):
        files = [folder / f"rank{r:05d}-of-{world_size:05d}.pth" for r in range(world_size)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"sharded checkpoint {folder} is incomplete: {len(absent)} of {world_size} shard "
                              f"files missing (first: {absent[:3]}); resume from an earlier copy of the run")
        self.pieces: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        for f in files:
            shard = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for key, local in shard["tensors"].items():
                self.pieces.setdefault(key, []).append((int(shard["offsets"][key]), local))
                self.shapes[key] = tuple(shard["shapes"][key])

    def keys(self) -> Iterable[str]:
        return self.shapes.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.shapes[key]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if not self.shapes[key]:
            return self.pieces[key][0][1]
        parts, pos = [], start
        while pos < stop:
            hit = next(((off, t) for off, t in self.pieces[key] if off <= pos < off + t.shape[0]), None)
            if hit is None:
                raise ConfigError(f"sharded checkpoint: no shard holds row {pos} of '{key}' "
                                  f"(shape {self.shapes[key]})")
            off, t = hit
            end = min(stop, off + t.shape[0])
            parts.append(t[pos - off:end - off])
            pos = end
        if not parts:
            return self.pieces[key][0][1][:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def split_optimizer_state(state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """An optimizer ``state_dict`` as (plain values, tensors keyed ``optimizer.<index>.<name>``)."""
    plain: Dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    tensors: Dict[str, torch.Tensor] = {}
    for index, entries in state["state"].items():
        plain["state"][index] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                plain["state"][index][name] = value
    return plain, tensors


def _whole(source, key: str) -> torch.Tensor:
    shape = source.shape(key)
    return source.rows(key, 0, shape[0] if shape else 1)


def training_tensors(modules: Dict[str, Dict[str, torch.Tensor]], optimizer_state: Optional[Dict[str, Any]]
                     ) -> Tuple[Optional[Dict[str, Any]], Dict[str, torch.Tensor]]:
    """The flat tensor layout of a training checkpoint, which sharded saves write and every load reads:
    ``<module>.<name>`` for each state dict of ``modules`` ('model', 'model_ema') and ``optimizer.<i>.<name>``;
    returned with the optimizer state's plain values (None without an optimizer state)."""
    plain, tensors = split_optimizer_state(optimizer_state) if optimizer_state is not None else (None, {})
    for prefix, state in modules.items():
        tensors.update({f"{prefix}.{k}": v for k, v in state.items()})
    return plain, tensors


def whole_tensors(source, prefix: str) -> Dict[str, torch.Tensor]:
    """Every ``prefix + name`` tensor of ``source``, whole, keyed by ``name``."""
    return {k[len(prefix):]: _whole(source, k) for k in source.keys() if k.startswith(prefix)}


def _laid_out_like(target: torch.Tensor, source, key: str) -> torch.Tensor:
    """``source[key]`` with ``target``'s layout: this process's rows as a DTensor, or the whole tensor."""
    if not _is_dtensor(target):
        return _whole(source, key)
    from torch.distributed.tensor import DTensor

    start, stop = local_rows(target)
    local = source.rows(key, start, stop).to(target.device)
    return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                              shape=target.shape, stride=target.stride())


def load_module(module: nn.Module, source, prefix: str, path: Path, what: str) -> None:
    """Copies ``prefix + name`` tensors from ``source`` into ``module``'s (possibly sharded) state, strictly."""
    own = module.state_dict()
    have = {k[len(prefix):] for k in source.keys() if k.startswith(prefix)}
    missing = [k for k in own if k not in have]
    unexpected = [k for k in have if k not in own]
    wrong = [f"{k} {source.shape(prefix + k)} vs {tuple(own[k].shape)}" for k in own
             if k in have and source.shape(prefix + k) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (first: {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {unexpected[:3]})" if unexpected else "",
                 f"{len(wrong)} of another shape (first: {wrong[:3]})" if wrong else ""]
        raise ConfigError(f"{what} {path} does not fit model {type(module).__name__}: "
                          + "; ".join(p for p in parts if p))
    module.load_state_dict({name: _laid_out_like(target, source, prefix + name) for name, target in own.items()})


def load_optimizer(optimizer: torch.optim.Optimizer, plain: Dict[str, Any], source) -> None:
    """Rebuilds the optimizer state: a tensor shaped like its parameter is laid out like it, others whole."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: Dict[Any, Dict[str, Any]] = {index: dict(entries) for index, entries in plain["state"].items()}
    for key in source.keys():
        if not key.startswith("optimizer."):
            continue
        index_text, name = key[len("optimizer."):].split(".", 1)
        index = int(index_text)
        param = params[index]
        if source.shape(key) == tuple(param.shape):
            value = _laid_out_like(param, source, key)
        else:  # e.g. Adam's step count: one whole value on every process
            value = _whole(source, key)
        state.setdefault(index, {})[name] = value.clone()  # not a view of a memory-mapped shard file
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_shards(folder: Path, tensors: Dict[str, torch.Tensor], rank: int, world_size: int) -> None:
    """This process's rows of every tensor, into ``folder/rank<r>-of-<W>.pth`` (written atomically)."""
    from .checkpoint import atomic_save

    pieces, offsets, shapes = {}, {}, {}
    for key, t in tensors.items():
        pieces[key] = local_tensor(t).detach().cpu().clone()
        offsets[key] = local_rows(t)[0]
        shapes[key] = list(t.shape)
    atomic_save({"tensors": pieces, "offsets": offsets, "shapes": shapes, "format": "zoo-shard-v1"},
                folder / f"rank{rank:05d}-of-{world_size:05d}.pth")


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Whole tensors of a sharded module on rank 0 (CPU; empty elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """Whether every floating tensor is finite on every rank (one reduction for all of them)."""
    flags = [torch.isfinite(local_tensor(t)).all() for t in tensors if t.is_floating_point()]
    ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)
    ok = ok.to(device=device, dtype=torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
