"""Safe checkpoint loading for every zoo family and the training script.

* ``.safetensors``: read with safetensors (no code can run).
* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.pth.tar``: ``torch.load(weights_only=True)`` first. Some published
  checkpoints also pickle objects that are not tensors (the official MSVMamba ones store a yacs
  ``CfgNode`` training config next to the weights), which ``weights_only`` rightly refuses. Those files
  are then read with a restricted unpickler: every global the pickle names is looked up in torch's own
  ``weights_only`` allow-list (tensor/storage rebuild functions, dtypes, ``OrderedDict``, ...); any other
  class or function is NEVER imported nor called. It becomes an inert :class:`PickledPlaceholder` that
  just records the arguments and state the pickle hands it, so the tensors around it still load.
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union

import torch

__all__ = [
    "PickledPlaceholder",
    "load_checkpoint_file",
    "extract_state_dict",
    "load_state_dict_file",
    "load_pretrained_file",
    "route_local_file_to_custom_load",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # .pth.tar: timm training checkpoints (MambaVision)
SAFETENSORS_SUFFIXES = (".safetensors",)
# where training scripts commonly nest the weights, most specific first
STATE_DICT_KEYS = ("state_dict", "model", "module", "net")


class PickledPlaceholder:
    """Stands in for a pickled object whose class the restricted unpickler refused to import.

    Nothing of the original class runs: construction, ``__setstate__``, item and list updates only
    record what the pickle stream passes. ``pickled_global`` names what was referenced
    (``'yacs.config.CfgNode'``); ``args``, ``state``, ``items`` and ``elements`` hold the raw data.
    """

    pickled_global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledPlaceholder":
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", {})
        object.__setattr__(self, "elements", [])
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the "class" with its args
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD
        object.__setattr__(self, "state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) for dict subclasses
        self.items[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) for list subclasses
        self.elements.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<PickledPlaceholder for {self.pickled_global}, not imported>"


_PLACEHOLDER_TYPES: Dict[str, Type[PickledPlaceholder]] = {}


def _placeholder_type(module: str, name: str) -> Type[PickledPlaceholder]:
    key = f"{module}.{name}"
    if key not in _PLACEHOLDER_TYPES:
        # a distinct subclass per global keeps ``isinstance`` checks and reprs informative
        _PLACEHOLDER_TYPES[key] = type(f"Placeholder[{key}]", (PickledPlaceholder,), {"pickled_global": key})
    return _PLACEHOLDER_TYPES[key]


def _allowed_globals() -> Dict[str, Any]:
    """torch's weights_only allow-list ("module.name" -> object), plus a fixed minimum if unavailable."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except (ImportError, AttributeError):  # private API moved: fall back to the essentials
        allowed = {}
    essentials = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
    }
    for key, obj in essentials.items():
        allowed.setdefault(key, obj)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; everything else becomes a placeholder type."""

    _allowed: Optional[Dict[str, Any]] = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        # protocol-2 pickles (torch.save's default) name Python 2 modules, e.g. '__builtin__.set'
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _RestrictedUnpickler._allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes added after this list was made
        return _placeholder_type(module, name)


def _restricted_pickle_module() -> types.ModuleType:
    module = types.ModuleType("zoo_restricted_pickle")
    module.Unpickler = _RestrictedUnpickler
    module.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
    module.loads = lambda b, **kw: _RestrictedUnpickler(io.BytesIO(b), **kw).load()
    module.UnpicklingError = pickle.UnpicklingError
    module.__version__ = "restricted"
    return module


def _torch_load_restricted(path: Path, map_location: Any) -> Any:
    # weights_only=False only because a custom pickle module is passed; that module never imports
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle_module())


def load_checkpoint_file(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Dict[str, Any]:
    """Loads a checkpoint file without executing code from it.

    Returns the file's top-level mapping (for a bare state dict, the state dict). Objects whose
    classes are not tensor-related come back as :class:`PickledPlaceholder` instances.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the suffix is not one of ``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.ckpt``, the
            file does not hold a mapping, or a safetensors file is given a ``map_location`` that is not
            one device.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            # safetensors places every tensor on one device; torch.load's dict / callable remapping has no equivalent
            raise ValueError(
                f"cannot load {path.name!r} with map_location={map_location!r}: safetensors files take one "
                "device (a str or torch.device) or None (cpu)")
        return dict(load_file(str(path), device=str(map_location) if map_location is not None else "cpu"))
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"cannot load checkpoint {path.name!r}: unknown suffix {suffix!r}; accepted: "
            + ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused a non-tensor global (e.g. a pickled config object): read the file
        # again with placeholders for such globals, importing and running none of them
        checkpoint = _torch_load_restricted(path, map_location)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"checkpoint {path.name!r} holds a {type(checkpoint).__name__}, expected a mapping "
            "(a state dict, or a dict holding one)"
        )
    return dict(checkpoint)


def extract_state_dict(checkpoint: Mapping[str, Any], keys: Tuple[str, ...] = STATE_DICT_KEYS) -> Dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint (under ``state_dict``/``model``/..., or itself).

    Tensors only; a ``module.`` prefix from DataParallel/DDP is stripped.
    """
    for key in keys:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            checkpoint = inner
            break
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ValueError(
            "no tensors found in the checkpoint; looked at the top level and under " + ", ".join(repr(k) for k in keys)
        )
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_file(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Dict[str, torch.Tensor]:
    """:func:`load_checkpoint_file` followed by :func:`extract_state_dict`."""
    return extract_state_dict(load_checkpoint_file(path, map_location))


def load_pretrained_file(
    model: torch.nn.Module,
    checkpoint_path: Union[str, os.PathLike],
    filter_fn: Callable[[Dict[str, Any], torch.nn.Module], Dict[str, torch.Tensor]],
    classifier: str,
    strict: bool = True,
) -> None:
    """Loads an official or zoo checkpoint file into ``model`` safely, as a model's ``load_pretrained``.

    ``filter_fn`` maps the loaded file to the model's keys. Classifier weights (keys under
    ``classifier + '.'``) are skipped when their shape does not fit the model's head (other
    ``num_classes``, or no head), as timm does for pretrained weights. With ``strict``, any other
    missing, unexpected or mis-shaped key raises a RuntimeError naming them; without, they are skipped.
    """
    state_dict = filter_fn(load_checkpoint_file(checkpoint_path), model)
    own = model.state_dict()
    head = classifier + "."
    for key in [k for k in state_dict if k.startswith(head)]:
        if key not in own or own[key].shape != state_dict[key].shape:
            del state_dict[key]
    missing = [k for k in own if k not in state_dict and not k.startswith(head)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        def some(keys: List[str]) -> str:
            return f"{len(keys)} {keys[:3]}{' ...' if len(keys) > 3 else ''}"

        shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
        raise RuntimeError(
            f"checkpoint {os.fspath(checkpoint_path)!r} does not fit this model: missing {some(missing)}, "
            f"unexpected {some(unexpected)}, shape mismatch (checkpoint vs model) {some(shapes)}"
        )
    for key in mismatched:
        del state_dict[key]
    model.load_state_dict(state_dict, strict=False)


def route_local_file_to_custom_load(kwargs: Dict[str, Any]) -> None:
    """Makes timm load a local ``pretrained_cfg_overlay=dict(file=...)`` through the model's
    ``load_pretrained`` (the safe loader above) rather than timm's ``torch.load(weights_only=True)``,
    which refuses official files that pickle a training config next to the weights. Edits ``kwargs``."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and overlay.get("file") and "custom_load" not in overlay:
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=True)


LOCAL_FILE_HINT = (
    "download the released checkpoint and load it locally with "
    "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')) "
    "(timm's local-file route, shown in docs/models.md)"
)


def build_with_local_file_hint(build: Callable[[], torch.nn.Module], variant: str) -> torch.nn.Module:
    """Runs ``build()`` (a ``build_model_with_cfg`` call) and adds the local-file route to timm's
    "no pretrained weights" error, for zoo models whose weights have no download URL."""
    try:
        return build()
    except RuntimeError as err:
        if "No pretrained weights exist" not in str(err):
            raise
        raise RuntimeError(f"{variant}: no downloadable pretrained weights; {LOCAL_FILE_HINT}") from err
