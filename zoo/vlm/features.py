"""Token features from any timm/zoo backbone, the common ground of every zoo.vlm integration.

Two layouts cover the zoo:

* ``tokens``: isotropic models (ViT, ViTamin, Vim) whose every block keeps one patch grid. A layer is a
  block; its output is the patch tokens in raster order, plus the prefix tokens (class / register tokens)
  when the model has them. The class token is always put first in ``cls_patch`` output, wherever the model
  keeps it internally (Vim's middle class token included).
* ``stages``: hierarchical models (ConvNeXt, ConvLLaVA, MSVMamba, EfficientViM, SHViT). A layer is a stage;
  its NCHW map is flattened to (B, H*W, C) in raster order. There are no prefix tokens.

Everything goes through the model's ``forward_intermediates`` so the same code serves every family, and
``feature_info`` gives widths and strides without running the model.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["FeatureLayout", "TokenFeatures", "describe_backbone", "extract_tokens"]


@dataclass(frozen=True)
class FeatureLayout:
    """What a backbone's intermediate features look like (read from ``feature_info``, no forward pass)."""

    kind: str  # 'tokens' or 'stages'
    channels: Tuple[int, ...]  # width of each layer (block or stage)
    reductions: Tuple[int, ...]  # stride of each layer w.r.t. the input image
    num_prefix_tokens: int  # class/register tokens kept outside the patch grid ('tokens' only)
    has_class_token: bool

    @property
    def num_layers(self) -> int:
        return len(self.channels)


@dataclass
class TokenFeatures:
    """One layer's features: patch tokens in raster order and, if any, the prefix tokens (class first)."""

    patches: torch.Tensor  # (B, H*W, C)
    prefix: Optional[torch.Tensor]  # (B, P, C) or None
    grid: Tuple[int, int]  # (H, W) of the patch grid


def describe_backbone(model: nn.Module) -> FeatureLayout:
    """Reads the feature layout of a timm-style model; raises if it lacks what zoo.vlm needs."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise TypeError(
            f"{type(model).__name__} has no forward_intermediates/feature_info; zoo.vlm accepts timm-style "
            "backbones (every zoo model and most timm models built by timm.create_model)."
        )
    info = list(model.feature_info)
    if not info:
        raise TypeError(f"{type(model).__name__}.feature_info is empty; cannot tell its layers apart.")
    channels = tuple(int(f["num_chs"]) for f in info)
    reductions = tuple(int(f["reduction"]) for f in info)
    isotropic = len(info) > 1 and len(set(reductions)) == 1 and len(set(channels)) == 1
    kind = "tokens" if isotropic else "stages"
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if kind == "tokens" else 0
    has_cls = kind == "tokens" and num_prefix > 0 and _class_token(model) is not None
    return FeatureLayout(kind, channels, reductions, num_prefix, has_cls)


def _class_token(model: nn.Module) -> Optional[torch.Tensor]:
    token = getattr(model, "cls_token", None)
    if token is None and getattr(model, "has_class_token", False):
        token = getattr(model, "class_token", None)
    return token


def resolve_layer(layout: FeatureLayout, index: int, *, hf_convention: bool) -> int:
    """Maps a user layer index to a 0-based position in ``feature_info``.

    With ``hf_convention`` (token models, as LLaVA's ``mm_vision_select_layer``), ``k >= 1`` is the output of
    block ``k`` and negatives count from the last block (-1 last, -2 penultimate); 0, the embedding output in
    Hugging Face's CLIP, is not exposed. Otherwise (stages) plain Python indexing over stages.
    """
    n = layout.num_layers
    what = "block" if layout.kind == "tokens" else "stage"
    if hf_convention:
        if index == 0:
            raise ValueError(
                "select_layer=0 (the embedding output) is not available; use 1..%d (output of that block) or "
                "a negative index (-1 = last block, -2 = penultimate, LLaVA's default)" % n
            )
        pos = index - 1 if index > 0 else n + index
        accepted = f"1..{n} or -{n}..-1"
    else:
        pos = index if index >= 0 else n + index
        accepted = f"0..{n - 1} or -{n}..-1"
    if not 0 <= pos < n:
        raise ValueError(f"{what} index {index} is out of range for a model with {n} {what}s; accepted: {accepted}")
    return pos


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def extract_tokens(
    model: nn.Module,
    pixel_values: torch.Tensor,
    positions: List[int],
    layout: Optional[FeatureLayout] = None,
    *,
    run_all_layers: bool = False,
) -> List[TokenFeatures]:
    """Runs the backbone once and returns the features of the given 0-based layer positions.

    ``run_all_layers`` keeps every block running (for hooks on blocks after the last selected one).
    """
    layout = layout or describe_backbone(model)
    fi = model.forward_intermediates
    kwargs = dict(indices=list(positions), norm=False, output_fmt="NCHW", intermediates_only=True)
    if _accepts(fi, "stop_early"):
        kwargs["stop_early"] = not run_all_layers
    want_prefix = layout.kind == "tokens" and layout.num_prefix_tokens > 0
    if want_prefix:
        kwargs["return_prefix_tokens"] = True
    outs = fi(pixel_values, **kwargs)
    if len(outs) != len(positions):
        raise RuntimeError(
            f"{type(model).__name__}.forward_intermediates returned {len(outs)} maps for {len(positions)} indices"
        )
    result = []
    for out in outs:
        prefix = None
        if isinstance(out, (tuple, list)):
            out, prefix = out
        if out.ndim != 4:
            raise RuntimeError(f"expected an NCHW intermediate, got shape {tuple(out.shape)}")
        b, c, h, w = out.shape
        patches = out.flatten(2).transpose(1, 2)
        if prefix is not None and prefix.ndim == 2:
            prefix = prefix.unsqueeze(1)
        result.append(TokenFeatures(patches, prefix, (h, w)))
    return result
