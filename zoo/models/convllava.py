"""ConvLLaVA's vision encoder: a ConvNeXt with an appended 5th stage, built on timm's ConvNeXt.

ConvLLaVA (alibaba/conv-llava, arXiv:2405.15738) uses the LAION CLIP ConvNeXt-L (``convnext_large_d_320``,
converted to the transformers ``ConvNextModel`` layout: dims 192/384/768/1536, depths 3/3/27/3) and appends
one more ConvNeXt stage (LayerNorm + 2x2 stride-2 conv downsampling, 6 blocks of width 3072). The total
stride becomes 64, so a 1536x1536 image gives a 24x24 map = 576 visual tokens of width 3072
(768 px -> 144 tokens).

The tokens are the last stage's map flattened row-major, with NO final norm: the tower reads
``hidden_states[-1]`` of ``ConvNextModel``, and that model's own final ``layernorm`` is sized for the 4th
stage (it was built before the 5th stage was appended) and never touches the tokens.

Any input size works; the token grid is ``(H // 64, W // 64)`` (each stride-2 conv floors).

Everything but the appended stage and the head width is timm's ``ConvNeXt`` unchanged, so timm's
``features_only``, ``forward_intermediates``, grad checkpointing and classifier reset apply to all 5 stages.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import DropPath, NormMlpClassifierHead, calculate_drop_path_rates, to_ntuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import named_apply
from timm.models.convnext import ConvNeXt, ConvNeXtStage, _get_norm_layers, _init_weights

from ..checkpoint import build_with_local_file_hint, extract_state_dict
from ..layers.helpers import leaf_function

__all__ = ["ConvLLaVAConvNeXt", "checkpoint_filter_fn", "from_official_kwargs", "token_grid"]

@torch.fx.wrap
@leaf_function
def check_image_batch(x: torch.Tensor, in_chans: int, stride: int) -> torch.Tensor:
    """``x`` unchanged, or a clear error (runs on real shapes under FX / TorchScript)."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if x.shape[-2] < stride or x.shape[-1] < stride:
        raise ValueError(
            f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the network stride {stride}; "
            f"height and width must be at least {stride} (the token grid is (H // {stride}, W // {stride}))")
    return x


def token_grid(height: int, width: int, patch_size: int = 4, num_stages: int = 5) -> Tuple[int, int]:
    """The (rows, cols) of the token grid for an input of the given size."""
    stride = patch_size * 2 ** (num_stages - 1)
    return height // stride, width // stride


class ConvLLaVAConvNeXt(ConvNeXt):
    """timm's ConvNeXt with ConvLLaVA's appended 5th stage.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier classes; 0 (the default) gives the bare vision tower, as released.
        global_pool: Pooling of the classifier head.
        depths: Blocks per stage; 5 entries (4 gives a plain 4-stage ConvNeXt trunk).
        dims: Width per stage, same length as ``depths``.
        kernel_sizes: Depthwise kernel size, one int or one per stage.
        ls_init_value: Layer-scale init value (transformers ``layer_scale_init_value``).
        patch_size: Stem patch size (stride of the stem conv).
        head_norm: Add a LayerNorm between pooling and classifier. Off by default because the official
            tower has no norm on its last stage, so official weights then load with every key matched.
        conv_bias, act_layer, norm_layer, norm_eps: as timm's ConvNeXt.
        drop_rate: Classifier dropout.
        drop_path_rate: Stochastic depth, ramped stage-wise over all stages including the 5th.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 0,
            global_pool: str = "avg",
            depths: Sequence[int] = (3, 3, 27, 3, 6),
            dims: Sequence[int] = (192, 384, 768, 1536, 3072),
            kernel_sizes: Union[int, Sequence[int]] = 7,
            ls_init_value: Optional[float] = 1e-6,
            patch_size: int = 4,
            head_norm: bool = False,
            conv_bias: bool = True,
            act_layer: str = "gelu",
            norm_layer: Optional[str] = None,
            norm_eps: Optional[float] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) not in (4, 5) or len(dims) != len(depths):
            raise ValueError(
                f"depths and dims must both have 5 entries (4 trunk stages + the appended stage) or both 4, "
                f"got depths={depths}, dims={dims}")
        if any(int(d) < 1 for d in depths) or any(int(c) < 1 for c in dims):
            raise ValueError(f"depths and dims must be positive, got depths={depths}, dims={dims}")
        num_stages = len(depths)
        kernel_sizes = to_ntuple(num_stages)(kernel_sizes)
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
            depths=depths[:4], dims=dims[:4], kernel_sizes=kernel_sizes[:4], ls_init_value=ls_init_value,
            stem_type="patch", patch_size=patch_size, conv_bias=conv_bias, act_layer=act_layer,
            norm_layer=norm_layer, norm_eps=norm_eps, drop_rate=drop_rate, drop_path_rate=0., **dd)

        norm_2d, norm_cl = _get_norm_layers(norm_layer, False, norm_eps)
        if num_stages == 5:
            extra_stage = ConvNeXtStage(
                dims[3], dims[4], kernel_size=kernel_sizes[4], stride=2, depth=depths[4],
                ls_init_value=ls_init_value, conv_bias=conv_bias, act_layer=act_layer,
                norm_layer=norm_2d, norm_layer_cl=norm_cl, **dd)
            named_apply(_init_weights, extra_stage)
            self.stages.append(extra_stage)
            self.feature_info.append(dict(
                num_chs=dims[4], reduction=self.feature_info[-1]["reduction"] * 2, module="stages.4"))
            self.num_features = dims[4]

        # the parent spreads stochastic depth over its 4 stages only; spread it over all of them
        if drop_path_rate > 0:
            rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
            for stage, stage_rates in zip(self.stages, rates):
                for block, rate in zip(stage.blocks, stage_rates):
                    block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()

        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, norm_layer=norm_2d,
            **dd)
        if not head_norm:
            self.head.norm = nn.Identity()
        named_apply(_init_weights, self.head, name="head")
        self.head_hidden_size = self.head.num_features
        self.token_stride: int = self.feature_info[-1]["reduction"]

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_image_batch(x, self.in_chans, self.token_stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's (B, C, H // 64, W // 64) map, without any final norm."""
        x = self._check_input(x)
        # ConvNeXt.forward_features written out: TorchScript cannot call super()
        x = self.stem(x)
        x = self.stages(x)
        return self.norm_pre(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ConvNeXt ``forward_intermediates`` over all stages (index 4 is the token map)."""
        x = self._check_input(x)
        return super().forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """ConvLLaVA's visual tokens: the final map flattened row-major to (B, H*W, C)."""
        return self.forward_features(x).flatten(2).transpose(1, 2)


# transformers ConvNextModel key -> timm ConvNeXt key (the appended stage uses the same layout)
_KEY_RULES = (
    (re.compile(r"^embeddings\.patch_embeddings\."), "stem.0."),
    (re.compile(r"^embeddings\.layernorm\."), "stem.1."),
    (re.compile(r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d+)\."), r"stages.\1.downsample.\2."),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$"), r"stages.\1.blocks.\2.gamma"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\."), r"stages.\1.blocks.\2.conv_dw."),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\."), r"stages.\1.blocks.\2.norm."),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\."), r"stages.\1.blocks.\2.mlp.fc1."),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\."), r"stages.\1.blocks.\2.mlp.fc2."),
)
# where the tower sits inside a full ConvLLaVA checkpoint (or a ConvNext classification model)
_TOWER_PREFIXES = (
    "model.vision_tower.vision_tower.", "vision_tower.vision_tower.", "model.vision_tower.", "vision_tower.",
    "convnext.", "")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Maps a conv-llava vision-tower state dict (transformers ConvNextModel keys) to this model.

    Accepts the tower alone, or a full ConvLLaVA / LLaVA checkpoint (only the ``vision_tower`` keys are
    taken). The tower's final ``layernorm`` is sized for the 4th stage and unused by ConvLLaVA; it is
    kept only if the model has a head norm of exactly that shape, otherwise dropped. Keys already in
    timm layout pass through. Keys that match no rule are kept, so a strict load names them.
    """
    state_dict = extract_state_dict(state_dict, keys=("state_dict", "model"))
    if "stem.0.weight" in state_dict:
        return dict(state_dict)
    prefix = next((p for p in _TOWER_PREFIXES if f"{p}embeddings.patch_embeddings.weight" in state_dict), None)
    if prefix is None:
        raise ValueError(
            "not a ConvLLaVA vision-tower checkpoint: found no 'embeddings.patch_embeddings.weight' key "
            f"(looked under prefixes {[p for p in _TOWER_PREFIXES if p]} and at the top level)")
    model_state = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.startswith(("layernorm.", "pooler.")):
            target = "head.norm." + key.split(".", 1)[1]
            if target in model_state and model_state[target].shape == value.shape:
                out[target] = value
            continue
        for pattern, replacement in _KEY_RULES:
            key, hits = pattern.subn(replacement, key)
            if hits:
                break
        out[key] = value
    return out


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url, "num_classes": 0, "input_size": (3, 1536, 1536), "pool_size": (24, 24),
        "crop_pct": 1.0, "interpolation": "bicubic",
        "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,  # LAION CLIP ConvNeXt preprocessing
        "first_conv": "stem.0", "classifier": "head.fc",
        "license": "apache-2.0", "paper_ids": "arXiv:2405.15738",
        "origin_url": "https://github.com/alibaba/conv-llava",
        **kwargs,
    }


# No downloadable weights: load the tower from a conv-llava checkpoint through checkpoint_filter_fn.
default_cfgs = generate_default_cfgs({
    "convllava_large.conv_llava_1536": _cfg(),
    "convllava_large.conv_llava_1024": _cfg(input_size=(3, 1024, 1024), pool_size=(16, 16)),
    "convllava_large.conv_llava_768": _cfg(input_size=(3, 768, 768), pool_size=(12, 12)),
    "convllava_tiny": _cfg(input_size=(3, 768, 768), pool_size=(12, 12)),
    "test_convllava": _cfg(input_size=(3, 64, 64), pool_size=(1, 1)),
})


def _create_convllava(variant: str, pretrained: bool = False, **kwargs: Any) -> ConvLLaVAConvNeXt:
    num_stages = len(kwargs.get("depths", (0,) * 5))
    if "output_stride" in kwargs:
        raise ValueError("ConvLLaVA encoders have a fixed output stride of 64; output_stride is not supported")
    return build_with_local_file_hint(lambda: build_model_with_cfg(
        ConvLLaVAConvNeXt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(num_stages)), flatten_sequential=True),
        **kwargs), variant)


_OFFICIAL_ARCH_KEYS = {
    "hidden_sizes", "depths", "vision_add_five_stage", "vision_five_stage_width", "patch_size",
    "layer_scale_init_value", "mm_vision_select_layer", "num_channels", "hidden_act",
}
# accepted because they appear in conv-llava configs but do not change the encoder's weights or tokens
_OFFICIAL_IGNORED_KEYS = {"mm_vision_resolution", "image_size", "mm_vision_select_feature", "layer_norm_eps"}


def from_official_kwargs(**official_kwargs: Any) -> ConvLLaVAConvNeXt:
    """Builds the encoder from conv-llava / transformers config values.

    Takes ``hidden_sizes`` and ``depths`` (the ConvNextModel trunk), ``vision_add_five_stage`` (depth of
    the appended stage; 0 = none), ``vision_five_stage_width``, and optionally ``patch_size``,
    ``layer_scale_init_value``, ``num_channels``, ``hidden_act`` ('gelu') and ``mm_vision_select_layer``
    (only -1, the last stage, is what ConvLLaVA uses). Returns a ``num_classes=0`` encoder whose
    ``forward_tokens`` gives the tower's tokens.
    """
    unknown = set(official_kwargs) - _OFFICIAL_ARCH_KEYS - _OFFICIAL_IGNORED_KEYS
    if unknown:
        raise ValueError(
            f"unsupported official kwargs {sorted(unknown)}; accepted: "
            f"{sorted(_OFFICIAL_ARCH_KEYS | _OFFICIAL_IGNORED_KEYS)}")
    missing = {"hidden_sizes", "depths"} - set(official_kwargs)
    if missing:
        raise ValueError(f"missing official kwargs {sorted(missing)}")
    hidden_sizes = list(official_kwargs["hidden_sizes"])
    depths = list(official_kwargs["depths"])
    if len(hidden_sizes) != 4 or len(depths) != 4:
        raise ValueError(
            f"hidden_sizes and depths describe the 4-stage ConvNextModel trunk, got "
            f"hidden_sizes={hidden_sizes}, depths={depths}")
    extra_depth = int(official_kwargs.get("vision_add_five_stage", 0))
    if extra_depth < 0:
        raise ValueError(f"vision_add_five_stage must be >= 0 (the 5th stage's depth), got {extra_depth}")
    if extra_depth:
        depths.append(extra_depth)
        hidden_sizes.append(int(official_kwargs.get("vision_five_stage_width", 1536)))
    select_layer = official_kwargs.get("mm_vision_select_layer", -1)
    if select_layer not in (-1, len(depths)):
        raise ValueError(
            f"mm_vision_select_layer={select_layer} is not supported; only -1 (the last stage's map, "
            f"what ConvLLaVA uses) is")
    hidden_act = official_kwargs.get("hidden_act", "gelu")
    if hidden_act != "gelu":
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; only 'gelu' (exact erf GELU) is")
    model_args = dict(
        depths=tuple(depths), dims=tuple(hidden_sizes),
        patch_size=int(official_kwargs.get("patch_size", 4)),
        ls_init_value=float(official_kwargs.get("layer_scale_init_value", 1e-6)),
        in_chans=int(official_kwargs.get("num_channels", 3)),
        num_classes=0,
    )
    variant = "convllava_large" if model_args["dims"] == (192, 384, 768, 1536, 3072) else "test_convllava"
    # the variant only picks preprocessing metadata; the architecture comes from model_args
    overlay = {}
    resolution = official_kwargs.get("mm_vision_resolution") or official_kwargs.get("image_size")
    if resolution:
        overlay["input_size"] = (model_args["in_chans"], int(resolution), int(resolution))
    return _create_convllava(variant, pretrained_cfg_overlay=overlay or None, **model_args)


@register_model
def convllava_large(pretrained: bool = False, **kwargs: Any) -> ConvLLaVAConvNeXt:
    """ConvLLaVA's released encoder: ConvNeXt-L (LAION CLIP) + 6 blocks of width 3072; ~669M params."""
    model_args = dict(depths=(3, 3, 27, 3, 6), dims=(192, 384, 768, 1536, 3072))
    return _create_convllava("convllava_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convllava_tiny(pretrained: bool = False, **kwargs: Any) -> ConvLLaVAConvNeXt:
    """ConvNeXt-T widths with a 5th stage (3 blocks, width 1536): a small ConvLLaVA-style encoder."""
    model_args = dict(depths=(3, 3, 9, 3, 3), dims=(96, 192, 384, 768, 1536))
    return _create_convllava("convllava_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_convllava(pretrained: bool = False, **kwargs: Any) -> ConvLLaVAConvNeXt:
    """Test-sized ConvLLaVA encoder (the parity fixture's shape): widths 16/24/32/48 + 2 blocks of 64."""
    model_args = dict(depths=(1, 1, 1, 1, 2), dims=(16, 24, 32, 48, 64))
    return _create_convllava("test_convllava", pretrained=pretrained, **dict(model_args, **kwargs))
