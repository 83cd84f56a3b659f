"""timm's EfficientViM, SHViT, ViTamin, ConvNeXt and FastViT (FastViTHD / MCi) as zoo families.

The architectures are timm's own (imported, never re-implemented). This module only adds what the zoo
promises for every family and timm 1.0.31 lacks:

* a tiny test-sized variant per family (``test_efficientvim``, ``test_shvit``, ``test_vitamin``,
  ``test_fastvithd``; timm already ships ``test_convnext``) so the conformance suite and CI can run every
  family on CPU;
* ``fastvithd``: timm's ``fastvit_mci3`` (FastVLM's FastViTHD encoder, MobileCLIP2's MCi3) whose final
  3x3 expansion conv (``final_conv``, stride 64, 2x the last stage's width: FastVLM's tower output) is one
  more feature level, so VLM towers and ``features_only`` can select it; same weights and keys as timm's;
* a clear error for a fixed-input-size model fed another size (timm's ViTamin otherwise fails deep inside
  with a tensor-size mismatch in the position-embedding add), see :func:`add_input_size_check`.

What timm already provides and the zoo relies on (checked for 1.0.31): ``features_only`` (EfficientViM
and ViTamin through ``forward_intermediates``, SHViT and ConvNeXt through module hooks),
``forward_intermediates``, ``set_grad_checkpointing`` and ``reset_classifier`` for all four.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models import efficientvim as _efficientvim
from timm.models import fastvit as _fastvit
from timm.models._features import feature_take_indices
from timm.models import shvit as _shvit
from timm.models import vitamin as _vitamin

__all__ = ["FastViTHD", "add_input_size_check", "fixed_input_size"]


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


class FastViTHD(_fastvit.FastVit):
    """timm's ``FastVit`` with ``final_conv`` exposed as the last feature level (index ``len(stages)``).

    Only ``feature_info``, ``forward_intermediates`` and ``prune_intermediate_layers`` change; the modules,
    state dict and ``forward`` are timm's.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        last = self.feature_info[-1]
        self.feature_info.append(dict(num_chs=self.num_features, reduction=last["reduction"], module="final_conv"))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's stage outputs, plus ``final_conv``'s output as level ``len(stages)``; NCHW only."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        stop = max_index if stop_early and not torch.jit.is_scripting() else num_stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[:stop + 1]):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if stop == num_stages:
            x = self.final_conv(x)
            if num_stages in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """As timm's, except that keeping the ``final_conv`` level keeps ``final_conv``."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        if max_index < len(self.stages):
            super().prune_intermediate_layers(take_indices, prune_norm, prune_head)
            self.feature_info = self.feature_info[:max_index + 1]
        elif prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _create_fastvithd(variant: str, cfg_variant: str, pretrained: bool = False, **kwargs: Any) -> FastViTHD:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        FastViTHD, cfg_variant, pretrained,
        pretrained_filter_fn=_fastvit.checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _fastvithd_args(layers: Tuple[int, ...], embed_dims: Tuple[int, ...], mlp_ratio: float) -> Dict[str, Any]:
    """The MCi layout of timm's ``fastvit_mci3``/``mci4``: 3 RepMixer stages, 2 attention stages with CPE."""
    cpe = partial(_fastvit.RepConditionalPosEnc, spatial_shape=(7, 7))
    return dict(
        layers=layers, embed_dims=embed_dims, mlp_ratios=(mlp_ratio,) * 5,
        se_downsamples=(False,) * 5, downsamples=(False, True, True, True, True),
        pos_embs=(None, None, None, cpe, cpe), token_mixers=("repmixer",) * 3 + ("attention",) * 2,
        lkc_use_act=True, norm_layer=partial(LayerNorm2d, eps=1e-5), stem_use_scale_branch=False,
    )


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
    "test_fastvithd": _cfg(
        input_size=(3, 128, 128), first_conv="stem.0.conv_kxk.0.conv", classifier="head.fc",
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    # timm's MobileCLIP2 MCi3 weights (the image tower FastVLM starts from), same keys
    "fastvithd.apple_mclip2_dfndr2b": get_pretrained_cfg("fastvit_mci3.apple_mclip2_dfndr2b").to_dict(),
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


@register_model
def fastvithd(pretrained: bool = False, **kwargs: Any) -> FastViTHD:
    """FastViTHD (FastVLM's encoder) = timm's ``fastvit_mci3`` with its final conv as a feature level:
    stages 96..1536 at strides 4..64, final conv to 3072 (1024 px -> 16 x 16 = 256 tokens of width 3072)."""
    model_args = _fastvithd_args(layers=(2, 12, 24, 4, 2), embed_dims=(96, 192, 384, 768, 1536), mlp_ratio=4)
    return _create_fastvithd("fastvithd", "fastvithd", pretrained, **dict(model_args, **kwargs))


@register_model
def test_fastvithd(pretrained: bool = False, **kwargs: Any) -> FastViTHD:
    """Tiny FastViTHD (timm's FastVit, MCi layout): 5 stages of 1 block, widths 8..128, strides 4..64, final conv 256."""
    model_args = _fastvithd_args(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128), mlp_ratio=2)
    return _create_fastvithd("test_fastvithd", "test_fastvithd", pretrained, **dict(model_args, **kwargs))
