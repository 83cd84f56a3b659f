"""open_clip integration: a zoo backbone as the image tower of an open_clip ``CLIP`` model.

Two routes:

* open_clip's own timm adapter already accepts any zoo model by name (``vision_cfg={'timm_model_name':
  'vim_small_patch16_224', 'timm_pool': '', 'timm_proj': 'linear'}``) once ``zoo`` is imported, but it always
  builds the model at its default input size and exposes only the pooled embedding.
* ``create_open_clip_model(cfg)`` takes the same config dict with ``vision_cfg={'zoo_model_name': ...}`` and
  uses ``ZooImageTower``: the input size is a parameter (position embeddings resized for ViT/Vim, native for
  hierarchical models), the pooled embedding is the backbone's own head pooling (final norm included), and
  ``output_tokens=True`` also returns the (optionally reduced) token sequence of the selected layer.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple, Union

import open_clip
import torch
import torch.nn as nn

from .encoder import VisionEncoder, create_backbone, default_image_size

__all__ = ["ZooImageTower", "create_open_clip_model"]

_TOWER_KEYS = {
    "zoo_model_name", "image_size", "zoo_model_args", "zoo_proj", "zoo_proj_bias", "zoo_pretrained",
    "zoo_checkpoint_path", "output_tokens", "select_layer", "select_stage", "keep_tokens", "keep_ratio",
    "reduction",
}


class ZooImageTower(nn.Module):
    """open_clip ``visual`` module: backbone trunk + projection to the joint embedding.

    ``forward(x)`` -> (B, embed_dim); with ``output_tokens`` -> (pooled, tokens) where tokens are the
    selected layer's patch tokens (B, N, C) after any token reduction, like open_clip's ViT tower.
    """

    def __init__(
        self,
        model_name: str,
        embed_dim: int,
        image_size: Optional[int] = None,
        *,
        proj: str = "linear",
        proj_bias: bool = False,
        model_args: Optional[Dict[str, Any]] = None,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        output_tokens: bool = False,
        select_layer: int = -1,
        select_stage: int = -1,
        keep_tokens: Optional[int] = None,
        keep_ratio: Optional[float] = None,
        reduction: str = "auto",
    ):
        super().__init__()
        if proj not in ("linear", "mlp", "none"):
            raise ValueError(f"proj={proj!r} is not supported; accepted: 'linear', 'mlp', 'none'")
        self.trunk = create_backbone(model_name, image_size=image_size, pretrained=pretrained,
                                     checkpoint_path=checkpoint_path, model_args=model_args)
        size = default_image_size(self.trunk, image_size)
        self.image_size = (size, size)
        object.__setattr__(self, "encoder", VisionEncoder(
            self.trunk, size, select_layer=select_layer, select_stage=select_stage, keep_tokens=keep_tokens,
            keep_ratio=keep_ratio, reduction=reduction))
        width = self.trunk.num_features
        if proj == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=proj_bias)
        elif proj == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(width, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim, bias=proj_bias))
        else:
            if width != embed_dim:
                raise ValueError(f"proj='none' needs the trunk width ({width}) to equal embed_dim ({embed_dim})")
            self.proj = nn.Identity()
        self.output_tokens = output_tokens

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freezes the trunk (open_clip's ``lock_image_tower``); the projection stays trainable."""
        if unlocked_groups:
            raise NotImplementedError("partial unlocking is not supported by ZooImageTower; lock all or nothing")
        self.trunk.requires_grad_(False)
        if freeze_bn_stats:
            open_clip.utils.freeze_batch_norm_2d(self.trunk)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        self.encoder.check_input(x)
        pooled = self.proj(self.trunk.forward_head(self.trunk.forward_features(x), pre_logits=True))
        if not self.output_tokens:
            return pooled
        return pooled, self.encoder(x)


def create_open_clip_model(model_cfg: Dict[str, Any], **overrides: Any) -> "open_clip.CLIP":
    """Builds an open_clip ``CLIP`` from a config dict whose ``vision_cfg`` names a zoo backbone.

    ``model_cfg`` follows open_clip's JSON configs (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...);
    ``vision_cfg`` takes ``zoo_model_name`` plus the options of ``ZooImageTower`` (``image_size``, ``zoo_proj``,
    ``zoo_model_args``, ``zoo_checkpoint_path``, ``keep_tokens``, ...). Keyword overrides update ``model_cfg``.
    """
    cfg = copy.deepcopy(dict(model_cfg))
    cfg.update(overrides)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model_cfg lacks {key!r}; open_clip configs need embed_dim, vision_cfg and text_cfg")
    vision = dict(cfg.pop("vision_cfg"))
    if "zoo_model_name" not in vision:
        raise ValueError("vision_cfg lacks 'zoo_model_name'; for open_clip's own towers use open_clip.CLIP(**cfg)")
    unknown = set(vision) - _TOWER_KEYS
    if unknown:
        raise ValueError(f"unknown vision_cfg key(s) {sorted(unknown)}; accepted: {sorted(_TOWER_KEYS)}")
    embed_dim = int(cfg["embed_dim"])
    tower = ZooImageTower(
        vision["zoo_model_name"], embed_dim, vision.get("image_size"),
        proj=vision.get("zoo_proj", "linear"), proj_bias=vision.get("zoo_proj_bias", False),
        model_args=vision.get("zoo_model_args"), pretrained=vision.get("zoo_pretrained", False),
        checkpoint_path=vision.get("zoo_checkpoint_path"), output_tokens=vision.get("output_tokens", False),
        select_layer=vision.get("select_layer", -1), select_stage=vision.get("select_stage", -1),
        keep_tokens=vision.get("keep_tokens"), keep_ratio=vision.get("keep_ratio"),
        reduction=vision.get("reduction", "auto"),
    )
    # open_clip builds a vision tower from vision_cfg in CLIP.__init__; give it a minimal one, then swap in ours
    placeholder = dict(layers=1, width=8, head_width=8, patch_size=8, image_size=8)
    model = open_clip.CLIP(vision_cfg=placeholder, **cfg)
    model.visual = tower
    return model
