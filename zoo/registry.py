"""The zoo's model registry: every backbone by family, with the facts other code needs about it.

All zoo models are timm models (``import zoo`` registers them), so names are timm names and
``timm.create_model`` works on them. This module adds the family view on top of timm's registry:

* :data:`FAMILIES` is the one declarative table of families: where each family's models are registered
  (the timm registry module name), whether the implementation is the zoo's or timm's, and its test-sized
  variant for CI. A family whose module has not landed yet simply lists no models.
* :func:`list_families`, :func:`list_models`, :func:`list_test_models`, :func:`get_family`.
* :func:`model_info` gives params, default input size, feature strides/channels, computed by building the
  model on the meta device (no memory, no weights) and cached.
* :func:`create_model` is ``timm.create_model`` plus a clear error for unknown names and the zoo's
  input-size check on fixed-size models.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

__all__ = [
    "FAMILIES", "Family", "ModelInfo", "create_model", "get_family", "list_families", "list_models",
    "list_test_models", "model_info",
]


@dataclass(frozen=True)
class Family:
    """One backbone family.

    Attributes:
        name: Family name used by ``list_models(family=...)``.
        source: 'zoo' (implemented in this package) or 'timm' (timm's implementation, reused).
        modules: timm registry module names whose models belong to the family (the last component of the
            Python module that registers them, e.g. ``zoo.models.vim`` -> 'vim').
        test_model: The tiny variant the conformance suite and CI run.
        extra_models: Models registered outside ``modules`` that belong to the family (the zoo's
            test variants of timm families live in ``zoo.models.timm_families``).
        description: One line for docs and tables.
    """
    name: str
    source: str
    modules: Tuple[str, ...]
    test_model: str
    extra_models: Tuple[str, ...] = ()
    description: str = ""


FAMILIES: Tuple[Family, ...] = (
    Family("vim", "zoo", ("vim",), "test_vim",
           description="Vision Mamba: bidirectional Mamba (selective scan) over ViT patch tokens"),
    Family("msvmamba", "zoo", ("msvmamba",), "test_msvmamba",
           description="MSVMamba: hierarchical multi-scale 2D selective-scan backbone"),
    Family("vmamba", "zoo", ("vmamba",), "test_vmamba",
           description="VMamba: hierarchical 2D selective scan (four directions summed), v0/v2/current releases"),
    Family("mambavision", "zoo", ("mambavision",), "test_mambavision",
           description="MambaVision: conv stages + windowed hybrid Mamba / self-attention stages"),
    Family("convllava", "zoo", ("convllava",), "test_convllava",
           description="ConvLLaVA encoder: timm ConvNeXt + appended 5th stage (stride 64 tokens)"),
    Family("efficientvim", "timm", ("efficientvim",), "test_efficientvim", ("test_efficientvim",),
           description="EfficientViM: hidden-state mixer SSD, fused multi-stage head (timm)"),
    Family("shvit", "timm", ("shvit",), "test_shvit", ("test_shvit",),
           description="SHViT: single-head vision transformer with macro design for efficiency (timm)"),
    Family("vitamin", "timm", ("vitamin",), "test_vitamin", ("test_vitamin",),
           description="ViTamin: MbConv stem stages + ViT blocks, CLIP-trained (timm)"),
    Family("fastvit", "timm", (), "test_fastvithd", ("fastvit_mci3", "fastvit_mci4", "fastvithd", "test_fastvithd"),
           description="FastViTHD / MCi: FastVLM's and MobileCLIP2's hybrid RepMixer + attention encoder (timm)"),
    Family("convnext", "timm", ("convnext",), "test_convnext",
           description="ConvNeXt and ConvNeXt-V2 (timm)"),
)
_FAMILY_BY_NAME: Dict[str, Family] = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class ModelInfo:
    """What other zoo code (VLM encoder, training, benchmarks) needs to know about a model.

    ``feature_reductions`` and ``feature_channels`` follow the model's ``feature_info`` (what
    ``features_only=True`` returns with its default ``out_indices``, or the superset of them).
    ``num_params`` counts the model as created with default arguments (classifier included when the
    default ``num_classes`` is non-zero).
    """
    name: str
    family: str
    source: str
    is_test: bool
    num_params: int
    input_size: Tuple[int, int, int]
    fixed_input_size: bool
    num_features: int
    num_classes: int
    feature_channels: Tuple[int, ...]
    feature_reductions: Tuple[int, ...]

    @property
    def max_reduction(self) -> int:
        return max(self.feature_reductions) if self.feature_reductions else 1


def list_families() -> List[str]:
    """Names of every zoo family (including ones whose models have not been registered yet)."""
    return [f.name for f in FAMILIES]


def _family(name: str) -> Family:
    try:
        return _FAMILY_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; families: {list_families()}") from None


def _registered(names) -> List[str]:
    return [n for n in names if timm.is_model(n)]


def _family_models(name: str) -> Tuple[str, ...]:
    family = _family(name)
    names = set()
    for module in family.modules:
        names.update(timm.list_models(module=module))
    names.update(_registered(family.extra_models))
    return tuple(sorted(names))


def list_models(family: Optional[str] = None, include_test: bool = True) -> List[str]:
    """Model names of one family, or of all zoo families (sorted).

    Args:
        family: A name from :func:`list_families`; None for every family.
        include_test: Also list the tiny test-sized variants (``test_*``).
    """
    families = [family] if family is not None else list_families()
    names = [n for f in families for n in _family_models(f)]
    if not include_test:
        names = [n for n in names if not n.startswith("test_")]
    return sorted(names)


def list_test_models() -> List[str]:
    """Each family's test-sized variant that is registered (a family still in progress has none)."""
    return [f.test_model for f in FAMILIES if timm.is_model(f.test_model)]


def _base_name(model_name: str) -> str:
    return model_name.split(".", 1)[0]


def get_family(model_name: str) -> str:
    """The family a model name (optionally with a ``.tag``) belongs to."""
    base = _base_name(model_name)
    for family in FAMILIES:
        if base in _family_models(family.name):
            return family.name
    raise ValueError(f"{model_name!r} is not a zoo model; see zoo.list_models(){_suggest(base)}")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=4)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=None)
def model_info(model_name: str) -> ModelInfo:
    """Facts about a zoo model, from building it on the meta device (no weights, no memory).

    Falls back to a CPU build for a model whose construction needs real tensors.
    """
    family = _family(get_family(model_name))
    base = _base_name(model_name)
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False)
    except (NotImplementedError, RuntimeError):
        model = timm.create_model(model_name, pretrained=False)
    feature_info = list(getattr(model, "feature_info", None) or [])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    from .models.timm_families import fixed_input_size
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    return ModelInfo(
        name=model_name,
        family=family.name,
        source=family.source,
        is_test=base == family.test_model or base.startswith("test_"),
        num_params=_count_params(model),
        input_size=input_size,
        fixed_input_size=bool(cfg.get("fixed_input_size", False)) or fixed_input_size(model) is not None,
        num_features=int(getattr(model, "num_features", 0)),
        num_classes=int(getattr(model, "num_classes", 0)),
        feature_channels=tuple(int(f["num_chs"]) for f in feature_info),
        feature_reductions=tuple(int(f["reduction"]) for f in feature_info),
    )


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for zoo (or any timm) models, with the zoo's guarantees added.

    Unknown names raise a ValueError with close matches. Models with a fixed input size (learned
    position embedding) reject other sizes with a clear ValueError instead of a shape error deep inside.
    """
    if not timm.is_model(_base_name(model_name)):
        close = difflib.get_close_matches(_base_name(model_name), list_models() or timm.list_models(), n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {model_name!r}: not registered with timm or the zoo{hint} "
                         f"(see zoo.list_models())")
    from .models.timm_families import add_input_size_check
    return add_input_size_check(timm.create_model(model_name, pretrained=pretrained, **kwargs))
