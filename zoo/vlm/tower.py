"""``ZooVisionTower``: a drop-in for LLaVA's ``CLIPVisionTower`` backed by any zoo/timm backbone."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .encoder import VisionEncoder, check_image_size, create_backbone, default_image_size
from .features import FeatureLayout, describe_backbone
from .processor import ImageProcessor

__all__ = ["ZooVisionTower", "VisionTowerArgs", "TowerConfig", "build_vision_tower"]

SELECT_FEATURES = ("patch", "cls_patch")
DEFAULT_SELECT_LAYER = -2  # LLaVA's mm_vision_select_layer default: the penultimate block
DEFAULT_SELECT_STAGE = -1  # the last stage


@dataclass
class VisionTowerArgs:
    """The options ZooVisionTower reads; any object with these attributes (LLaVA's model args) works too.

    LLaVA's own names are read first (``mm_vision_select_layer``, ``mm_vision_select_feature``,
    ``unfreeze_mm_vision_tower``, ``image_aspect_ratio``); the zoo options below may carry an ``mm_vision_``
    prefix or not.
    """

    mm_vision_select_layer: int = -2  # token models: -2 = penultimate block (LLaVA default)
    mm_vision_select_feature: str = "patch"  # 'patch' or 'cls_patch'
    select_stage: int = -1  # hierarchical models: which stage (-1 = last)
    image_size: Optional[int] = None  # input resolution (default: the model's pretrained_cfg)
    keep_tokens: Optional[int] = None  # token reduction: patch tokens kept
    keep_ratio: Optional[float] = None  # ... or the fraction kept
    reduction: str = "auto"  # 'auto', 'cls_attention', 'cls_similarity', 'deviation', 'pool'
    image_aspect_ratio: str = "pad"  # processor mode: 'pad', 'resize' or 'crop'
    unfreeze_mm_vision_tower: bool = False  # train the tower (no torch.no_grad, requires_grad on)
    pretrained: bool = False  # timm pretrained weights (needs them in the local cache)
    checkpoint_path: Optional[str] = None  # local safetensors / weights-only torch file
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra kwargs for timm.create_model


def _option(args: Any, name: str, default: Any) -> Any:
    for key in (name, f"mm_vision_{name}"):
        if args is not None and getattr(args, key, None) is not None:
            return getattr(args, key)
    return default


@dataclass
class TowerConfig:
    """What LLaVA-style code reads from ``vision_tower.config`` (Hugging Face CLIPVisionConfig names)."""

    model_name: str
    image_size: int
    patch_size: int  # stride of the selected layer in input pixels
    hidden_size: int
    num_patches: int
    grid: tuple
    kind: str
    select_layer: int
    select_stage: int
    select_feature: str
    reduction: Optional[str]
    keep_tokens: Optional[int]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def check_layer_options(
    name: str, layout: FeatureLayout, select_layer: Optional[int], select_stage: Optional[int]
) -> Tuple[int, int]:
    """``select_layer`` picks a block of a token model, ``select_stage`` a stage of a hierarchical one; the other
    option is refused unless it is unset or its default (LLaVA passes ``mm_vision_select_layer=-2`` always)."""
    n = layout.num_layers
    if layout.kind == "tokens" and select_stage not in (None, DEFAULT_SELECT_STAGE):
        raise ValueError(
            f"select_stage={select_stage} applies to hierarchical models; {name} is a token model with {n} "
            f"blocks: use select_layer in 1..{n} or -{n}..-1 (LLaVA's default -2 = penultimate)")
    if layout.kind == "stages" and select_layer not in (None, DEFAULT_SELECT_LAYER):
        raise ValueError(
            f"select_layer={select_layer} applies to token models; {name} is hierarchical with {n} stages: "
            f"use select_stage in 0..{n - 1} or -{n}..-1 (default -1 = last stage)")
    layer = DEFAULT_SELECT_LAYER if select_layer is None else select_layer
    stage = DEFAULT_SELECT_STAGE if select_stage is None else select_stage
    return layer, stage


class ZooVisionTower(nn.Module):
    """LLaVA vision tower interface for every registered backbone.

    ``ZooVisionTower('vim_small_patch16_224', args)`` mirrors ``CLIPVisionTower(name, args)``: attributes
    ``hidden_size``, ``num_patches``, ``num_patches_per_side``, ``image_processor``, ``dtype``, ``device``,
    ``config``, ``is_loaded``; ``load_model()``; ``forward(images)`` -> (B, tokens, hidden_size), or for a list
    of images a list of (1, tokens, hidden_size). Frozen (eval, no grad) unless ``unfreeze_mm_vision_tower``.
    Token models return patch tokens of block ``select_layer``; hierarchical models the flattened map of stage
    ``select_stage``. With ``select_feature='cls_patch'`` the class token (if any) comes first.
    """

    def __init__(self, vision_tower: str, args: Any = None, delay_load: bool = False, **overrides: Any):
        super().__init__()
        if not isinstance(vision_tower, str) or not vision_tower:
            raise ValueError(f"vision_tower must be a model name, got {vision_tower!r}")
        args = args if args is not None else VisionTowerArgs()
        opt = dict(
            select_layer=_option(args, "select_layer", None),
            select_feature=_option(args, "select_feature", "patch"),
            select_stage=_option(args, "select_stage", None),
            image_size=_option(args, "image_size", None),
            keep_tokens=_option(args, "keep_tokens", None),
            keep_ratio=_option(args, "keep_ratio", None),
            reduction=_option(args, "reduction", "auto"),
            image_aspect_ratio=_option(args, "image_aspect_ratio", "pad"),
            trainable=bool(_option(args, "unfreeze_mm_vision_tower", False)),
            pretrained=bool(_option(args, "pretrained", False)),
            checkpoint_path=_option(args, "checkpoint_path", None),
            model_args=dict(_option(args, "model_args", {}) or {}),
        )
        unknown = set(overrides) - set(opt)
        if unknown:
            raise TypeError(f"unknown ZooVisionTower option(s) {sorted(unknown)}; accepted: {sorted(opt)}")
        opt.update(overrides)
        if opt["select_feature"] not in SELECT_FEATURES:
            raise ValueError(f"unexpected select feature {opt['select_feature']!r}; accepted: {SELECT_FEATURES}")
        if opt["image_aspect_ratio"] not in ("pad", "resize", "crop"):
            opt["image_aspect_ratio"] = "pad"  # LLaVA's 'anyres'/'square' etc. tile or stretch upstream
        self.vision_tower_name = vision_tower
        self.options = opt
        self.select_layer = DEFAULT_SELECT_LAYER if opt["select_layer"] is None else opt["select_layer"]
        self.select_feature = opt["select_feature"]
        self.is_loaded = False
        # kept outside the module tree so the weights appear once, under ``vision_tower.``
        object.__setattr__(self, "encoder", None)
        object.__setattr__(self, "_spec", None)
        if not delay_load or opt["trainable"]:
            self.load_model()
        else:
            # like LLaVA's cfg_only: shapes known, no weights allocated (meta tensors)
            object.__setattr__(self, "_spec", self._make_encoder(meta=True))
            self.image_processor = ImageProcessor.from_model(
                self._spec.model, image_size=self._spec.image_size, mode=opt["image_aspect_ratio"])

    def _make_encoder(self, meta: bool) -> VisionEncoder:
        o = self.options
        check_image_size(o["image_size"])
        model = create_backbone(
            self.vision_tower_name, image_size=o["image_size"], pretrained=o["pretrained"],
            checkpoint_path=o["checkpoint_path"], model_args=o["model_args"], meta=meta,
        )
        size = default_image_size(model, o["image_size"])
        select_layer, select_stage = check_layer_options(
            self.vision_tower_name, describe_backbone(model), o["select_layer"], o["select_stage"])
        return VisionEncoder(
            model, size, select_layer=select_layer, select_stage=select_stage,
            keep_tokens=o["keep_tokens"], keep_ratio=o["keep_ratio"], reduction=o["reduction"],
        )

    def load_model(self, device_map: Any = None) -> None:
        if self.is_loaded:
            return
        object.__setattr__(self, "encoder", self._make_encoder(meta=False))
        self.vision_tower = self.encoder.model  # the name LLaVA code (and its checkpoints) use
        self.image_processor = ImageProcessor.from_model(
            self.vision_tower, image_size=self.encoder.image_size, mode=self.options["image_aspect_ratio"]
        )
        trainable = self.options["trainable"]
        self.vision_tower.requires_grad_(trainable)
        self.vision_tower.train(trainable)
        object.__setattr__(self, "_spec", None)
        self.is_loaded = True

    def train(self, mode: bool = True) -> "ZooVisionTower":
        # a frozen tower stays in eval mode (BatchNorm/dropout) even inside a model put in training mode
        super().train(mode)
        if self.is_loaded and not self.options["trainable"]:
            self.vision_tower.eval()
        return self

    @property
    def _enc(self) -> VisionEncoder:
        return self.encoder if self.encoder is not None else self._spec

    def feature_select(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values, with_prefix=self.select_feature == "cls_patch")

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.feature_select(x).to(pixel_values.dtype)

    def forward(self, images: Union[torch.Tensor, List[Any]]) -> Union[torch.Tensor, List[torch.Tensor]]:
        if not self.is_loaded:
            raise RuntimeError("the vision tower is not loaded; call load_model() first (delay_load=True was given)")
        with torch.set_grad_enabled(self.options["trainable"] and torch.is_grad_enabled()):
            if isinstance(images, (list, tuple)):
                return [self._encode(self._as_batch(im)) for im in images]
            return self._encode(self._as_batch(images))

    def _as_batch(self, image: Any) -> torch.Tensor:
        """Float (3, H, W) / (B, 3, H, W) tensors are taken as pixel_values already; anything else (PIL images,
        uint8 arrays or tensors, lists of them) goes through ``image_processor``."""
        is_pixels = isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim in (3, 4)
        if is_pixels and image.shape[-3] == 3:
            return image if image.ndim == 4 else image.unsqueeze(0)
        # raw images (PIL, uint8 arrays/tensors) go through the tower's processor
        return self.image_processor(image, return_tensors="pt")["pixel_values"]

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self._enc.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self._enc.model.parameters()).device

    @property
    def config(self) -> TowerConfig:
        e = self._enc
        return TowerConfig(
            model_name=self.vision_tower_name, image_size=e.image_size, patch_size=e.stride,
            hidden_size=e.hidden_size, num_patches=e.num_patches, grid=tuple(e.grid), kind=e.layout.kind,
            select_layer=e.select_layer, select_stage=e.select_stage,
            select_feature=self.select_feature, reduction=e.reduction if e.keep else None, keep_tokens=e.keep,
        )

    @property
    def hidden_size(self) -> int:
        return self._enc.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        """Side of the unreduced patch grid (LLaVA-NeXT unpadding uses it; with reduction, see num_patches)."""
        return self._enc.grid[0]

    @property
    def num_patches(self) -> int:
        """Patch tokens per image in the output (class token excluded), after any reduction."""
        return self._enc.num_patches


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> ZooVisionTower:
    """LLaVA's ``build_vision_tower`` hook: reads ``mm_vision_tower`` (or ``vision_tower``) from the config."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if name is None:
        raise ValueError("the config has neither mm_vision_tower nor vision_tower")
    return ZooVisionTower(name, args=vision_tower_cfg, **kwargs)
