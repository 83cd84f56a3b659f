"""``VisionEncoder``: a backbone plus the layer choice and token reduction shared by every zoo.vlm front end."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from .features import FeatureLayout, TokenFeatures, describe_backbone, extract_tokens, resolve_layer
from .reduction import (
    REDUCTIONS,
    CLSAttentionProbe,
    cls_similarity_scores,
    default_reduction,
    deviation_scores,
    find_last_attention,
    grid_for,
    keep_top_tokens,
    pool_to_grid,
    resolve_keep,
)

__all__ = ["VisionEncoder", "create_backbone", "default_image_size", "check_image_size"]


def create_backbone(
    model_name: str,
    *,
    image_size: Optional[int] = None,
    pretrained: bool = False,
    checkpoint_path: Optional[str] = None,
    model_args: Optional[Dict[str, Any]] = None,
    meta: bool = False,
) -> nn.Module:
    """Builds a backbone through timm's builder at the requested input size.

    Token models (ViT, Vim) take ``img_size`` and resize their position embedding when loading weights;
    hierarchical models are size-agnostic, so ``img_size`` is only passed where the constructor accepts it.
    ``checkpoint_path`` (safetensors or a weights-only torch file) goes through timm's pretrained path so the
    family's ``checkpoint_filter_fn`` (position-embedding resampling included) applies.
    """
    check_image_size(image_size)
    kwargs: Dict[str, Any] = dict(model_args or {})
    kwargs.setdefault("num_classes", 0)
    if checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint_path), hf_hub_id=None, url=None)
        pretrained = True
    if image_size is not None:
        kwargs["img_size"] = int(image_size)

    def build(**kw):
        if meta:
            try:
                with torch.device("meta"):
                    return timm.create_model(model_name, pretrained=False, **kw)
            except (NotImplementedError, RuntimeError) as err:
                if "meta" not in str(err):
                    raise
                # the constructor reads tensor data (some init schemes do): build for real, without weights
        return timm.create_model(model_name, pretrained=pretrained and not meta, **kw)

    try:
        return build(**kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        kwargs.pop("img_size")  # size-agnostic (hierarchical) model
        return build(**kwargs)


def check_image_size(image_size: Any) -> None:
    """None (the model's default) or a positive int; 0 is not a silent "default"."""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (or None for the model's default), got {image_size!r}")


def default_image_size(model: nn.Module, image_size: Optional[int] = None) -> int:
    """``image_size`` if given, else the square input side of the model's ``pretrained_cfg`` (224 if unset)."""
    check_image_size(image_size)
    if image_size is not None:
        return int(image_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def probe_grid(
    model: nn.Module, image_size: Union[int, Tuple[int, int]], position: int, layout: FeatureLayout
) -> Tuple[int, int]:
    """Patch grid of one layer at ``image_size`` (a side or (H, W)), found by a shape-only (meta tensor) forward.

    Strided convolutions round differently per family (floor or ceil), so for sizes that are not a multiple
    of the stride the grid is measured rather than derived. Falls back to ``size // stride`` if the model cannot
    run on meta tensors.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    stride = layout.reductions[position]
    if h % stride == 0 and w % stride == 0:  # every floor/ceil rounding agrees on exact multiples: no probe
        return h // stride, w // stride
    wrapper = _LayerProbe(model, position, layout)
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(wrapper.named_parameters()) + list(wrapper.named_buffers())
    }
    x = torch.empty(2, 3, h, w, device="meta")
    try:
        with torch.no_grad():
            return torch.func.functional_call(wrapper, state, (x,), strict=False)
    except Exception:  # noqa: BLE001  (any op without a meta kernel, or a size the model refuses)
        return h // stride, w // stride


class _LayerProbe(nn.Module):
    def __init__(self, model: nn.Module, position: int, layout: FeatureLayout):
        super().__init__()
        self.model = model
        self.position = position
        self.layout = layout

    def forward(self, x: torch.Tensor) -> Tuple[int, int]:
        return extract_tokens(self.model, x, [self.position], self.layout)[0].grid


class VisionEncoder(nn.Module):
    """A backbone returning (B, tokens, C) features of one layer, optionally reduced to ``keep`` tokens.

    Args:
        model: a timm-style backbone (``forward_intermediates`` + ``feature_info``).
        image_size: the input resolution the token counts refer to.
        select_layer: token models: LLaVA convention (-2 penultimate block, k >= 1 output of block k).
        select_stage: hierarchical models: stage index (-1 last stage).
        keep_tokens / keep_ratio: patch tokens to keep (None: all).
        reduction: one of ``REDUCTIONS``; 'auto' picks the family's rule (see zoo.vlm.reduction).
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        *,
        select_layer: int = -2,
        select_stage: int = -1,
        keep_tokens: Optional[int] = None,
        keep_ratio: Optional[float] = None,
        reduction: str = "auto",
    ):
        super().__init__()
        self.model = model
        self.layout: FeatureLayout = describe_backbone(model)
        self.image_size = int(image_size)
        if self.layout.kind == "tokens":
            self.position = resolve_layer(self.layout, select_layer, hf_convention=True)
        else:
            self.position = resolve_layer(self.layout, select_stage, hf_convention=False)
        self.select_layer, self.select_stage = select_layer, select_stage
        self.stride = self.layout.reductions[self.position]
        self.grid = probe_grid(model, self.image_size, self.position, self.layout)
        if self.grid[0] < 1 or self.grid[1] < 1:
            raise ValueError(
                f"image_size={self.image_size} is too small for one patch token at the selected layer (stride "
                f"{self.stride} px, grid {self.grid[0]}x{self.grid[1]}); the smallest accepted size is {self.stride}")
        self.keep = resolve_keep(self.grid[0] * self.grid[1], keep_tokens, keep_ratio)
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}")
        # FasterVLM reads the [CLS] attention of the layer whose output is selected (LLaVA: the penultimate block),
        # i.e. the last attention layer the selected features went through
        self.attention = None
        if self.layout.has_class_token:
            layer_name = model.feature_info[self.position].get("module")
            layer = model.get_submodule(layer_name) if layer_name else None
            self.attention = find_last_attention(layer) if layer is not None else None
        if reduction == "auto":
            reduction = default_reduction(self.layout.has_class_token, self.attention is not None)
        if reduction == "cls_attention" and (self.attention is None or not self.layout.has_class_token):
            raise ValueError(
                "reduction='cls_attention' (FasterVLM) needs a class token and a softmax attention layer; "
                f"{type(model).__name__} lacks them, use 'deviation' or 'pool' (or 'cls_similarity' with a class token)"
            )
        if reduction == "cls_similarity" and not self.layout.has_class_token:
            raise ValueError(f"reduction='cls_similarity' needs a class token; {type(model).__name__} has none")
        self.reduction = reduction
        self.pool_grid = grid_for(self.keep, self.grid) if (self.keep and reduction == "pool") else None

    @property
    def hidden_size(self) -> int:
        return self.layout.channels[self.position]

    @property
    def num_patches(self) -> int:
        """Patch tokens per image in the output (after reduction; the class token not counted)."""
        return self.keep if self.keep is not None else self.grid[0] * self.grid[1]

    def check_input(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor, got {shape}")

    def check_keep_fits(self, pixel_values: torch.Tensor) -> None:
        """Token reduction keeps ``keep`` of the input's patches: an input smaller than ``image_size`` may have
        fewer than that, which is a clear error rather than an indexing failure deep in top-k."""
        h, w = pixel_values.shape[-2:]
        if (h, w) == (self.image_size, self.image_size):
            return
        grid = probe_grid(self.model, (int(h), int(w)), self.position, self.layout)
        if self.reduction != "pool" and grid[0] * grid[1] < self.keep:
            raise ValueError(
                f"keep_tokens={self.keep} but a {h}x{w} input gives only {grid[0] * grid[1]} patch tokens "
                f"({grid[0]}x{grid[1]}); the tower was built for {self.image_size}x{self.image_size} inputs: resize "
                "to that (the tower's image_processor does) or lower keep_tokens")

    def forward_layers(
        self, pixel_values: torch.Tensor, positions: Sequence[int]
    ) -> Tuple[List[TokenFeatures], Optional[torch.Tensor]]:
        """Features of the given layer positions plus the [CLS]-attention scores when the rule needs them."""
        self.check_input(pixel_values)
        if pixel_values.shape[0] == 0:  # many backbones reshape with -1: run one blank image, return none
            feats, scores = self.forward_layers(pixel_values.new_zeros((1,) + pixel_values.shape[1:]), positions)
            empty = [TokenFeatures(f.patches[:0], None if f.prefix is None else f.prefix[:0], f.grid) for f in feats]
            return empty, None if scores is None else scores[:0]
        if self.keep is not None:
            self.check_keep_fits(pixel_values)
        if self.keep is not None and self.reduction == "cls_attention":
            with CLSAttentionProbe(self.attention, cls_index=0) as probe:
                feats = extract_tokens(self.model, pixel_values, list(positions), self.layout)
            return feats, probe.scores[:, self.layout.num_prefix_tokens :]
        return extract_tokens(self.model, pixel_values, list(positions), self.layout), None

    def reduce(
        self, feats: TokenFeatures, attn_scores: Optional[torch.Tensor], reference: Optional[TokenFeatures] = None
    ) -> torch.Tensor:
        """Applies the reduction to one layer's patch tokens. ``reference`` is the layer the data-driven scores
        are computed on (defaults to ``feats``), so every hidden state can share one token selection."""
        patches = feats.patches
        if self.keep is None:
            return patches
        ref = reference or feats
        if self.reduction == "pool":
            return pool_to_grid(patches, feats.grid, self.pool_grid)
        if self.reduction == "cls_attention":
            scores = attn_scores
        elif self.reduction == "cls_similarity":
            scores = cls_similarity_scores(ref.patches, ref.prefix[:, 0])
        else:
            scores = deviation_scores(ref.patches)
        if scores.shape[1] != patches.shape[1]:
            raise RuntimeError(f"{scores.shape[1]} scores for {patches.shape[1]} patch tokens")
        return keep_top_tokens(patches, scores, self.keep)[0]

    def forward(self, pixel_values: torch.Tensor, with_prefix: bool = False) -> torch.Tensor:
        """(B, [1 +] num_patches, hidden_size) features of the selected layer; ``with_prefix`` puts the class
        token (if the model has one) first. Register tokens are never returned."""
        (feats,), attn_scores = self.forward_layers(pixel_values, [self.position])
        tokens = self.reduce(feats, attn_scores)
        if with_prefix and self.layout.has_class_token and feats.prefix is not None:
            tokens = torch.cat([feats.prefix[:, :1], tokens], dim=1)  # the class token only, no registers
        return tokens
