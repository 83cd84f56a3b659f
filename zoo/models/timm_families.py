"""timm's EfficientViM, SHViT, ViTamin and ConvNeXt as zoo families.

The architectures are timm's own (imported, never re-implemented). This module only adds what the zoo
promises for every family and timm 1.0.31 lacks:

* a tiny test-sized variant per family (``test_efficientvim``, ``test_shvit``, ``test_vitamin``; timm
  already ships ``test_convnext``) so the conformance suite and CI can run every family on CPU;
* a clear error for a fixed-input-size model fed another size (timm's ViTamin otherwise fails deep inside
  with a tensor-size mismatch in the position-embedding add), see :func:`add_input_size_check`.

What timm already provides and the zoo relies on (checked for 1.0.31): ``features_only`` (EfficientViM
and ViTamin through ``forward_intermediates``, SHViT and ConvNeXt through module hooks),
``forward_intermediates``, ``set_grad_checkpointing`` and ``reset_classifier`` for all four.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import generate_default_cfgs, register_model
from timm.models import efficientvim as _efficientvim
from timm.models import shvit as _shvit
from timm.models import vitamin as _vitamin

__all__ = ["add_input_size_check", "fixed_input_size"]


def fixed_input_size(model: nn.Module) -> Tuple[int, int] | None:
    """The (H, W) a model insists on, or None when it accepts other sizes.

    A model is fixed-size when it has a learned position embedding tied to the patch grid of its build
    size (``patch_embed.img_size`` with ``strict_img_size``) and was not built with ``dynamic_img_size``.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(model, "dynamic_img_size", False):
        return None
    if not getattr(patch_embed, "strict_img_size", False) or getattr(patch_embed, "img_size", None) is None:
        return None
    height, width = patch_embed.img_size
    return int(height), int(width)


def _check_input_size(module: nn.Module, args: Tuple[Any, ...]) -> None:
    expected = module._zoo_fixed_input_size
    x = args[0]
    if not torch.is_tensor(x) or x.ndim != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got {shape}")
    got = (int(x.shape[-2]), int(x.shape[-1]))
    if got != expected:
        raise ValueError(
            f"this model has a fixed input size of {expected[0]}x{expected[1]} (its position embedding "
            f"is built for that grid), got an input of size {got[0]}x{got[1]}; create it with "
            f"img_size={got} or dynamic_img_size=True to use another size")


def add_input_size_check(model: nn.Module) -> nn.Module:
    """Makes a fixed-input-size model reject other sizes with a clear ValueError; returns the model.

    The check is a forward pre-hook on ``model.patch_embed``, so it guards ``forward``,
    ``forward_features``, ``forward_intermediates`` and timm's ``features_only`` wrappers alike. Models
    that accept any size are returned unchanged. Calling it twice installs one hook.
    """
    # timm's features_only getter wraps the model as `.model`; guard the wrapped one
    inner = model.model if isinstance(getattr(model, "model", None), nn.Module) else model
    size = fixed_input_size(inner)
    if size is None or getattr(inner.patch_embed, "_zoo_fixed_input_size", None) is not None:
        return model
    inner.patch_embed._zoo_fixed_input_size = size
    inner.patch_embed.register_forward_pre_hook(_check_input_size)
    return model


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 64, 64), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        **kwargs,
    }


# Test-sized variants only: random init, no weights (nothing to download).
default_cfgs = generate_default_cfgs({
    "test_efficientvim": _cfg(
        first_conv="patch_embed.conv.0.conv", classifier=("heads.0", "heads.1", "heads.2", "heads.3")),
    "test_shvit": _cfg(first_conv="patch_embed.0.c", classifier="head.l"),
    "test_vitamin": _cfg(
        first_conv="patch_embed.backbone.stem.conv1", classifier="head", fixed_input_size=True,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
})


@register_model
def test_efficientvim(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Tiny EfficientViM (timm's implementation): 3 stages of 1 block, widths 16/24/32, strides 16/32/64."""
    model_args = dict(embed_dim=(16, 24, 32), depths=(1, 1, 1), state_dim=(9, 4, 1))
    return _efficientvim._create_efficientvim(
        "test_efficientvim", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_shvit(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Tiny SHViT (timm's implementation): 3 stages of 1 block, widths 16/24/32, strides 16/32/64."""
    model_args = dict(
        embed_dim=(16, 24, 32), partial_dim=(8, 8, 12), qk_dim=(8, 8, 8), depth=(1, 1, 1),
        types=("i", "s", "s"))
    return _shvit._create_shvit("test_shvit", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vitamin(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Tiny ViTamin (timm's implementation): MbConv stem stages 16/24, 2 GeGLU ViT blocks of width 32."""
    embed_cfg = _vitamin.VitCfg(
        embed_dim=(16, 24, 32),
        depths=(1, 1, 1),
        stem_width=16,
        conv_cfg=_vitamin.VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    model_args = dict(
        img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_layer=_vitamin.GeGluMlp, mlp_ratio=2.,
        class_token=False, global_pool="avg", embed_cfg=embed_cfg,
        out_indices=kwargs.pop("out_indices", 2),  # timm's default (last 3 blocks) exceeds this depth
    )
    model = _vitamin._create_vitamin("test_vitamin", pretrained=pretrained, **dict(model_args, **kwargs))
    return add_input_size_check(model)
