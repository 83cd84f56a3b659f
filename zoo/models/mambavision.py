"""MambaVision (Hatamizadeh & Kautz, CVPR 2025, arXiv:2407.08083) as timm models.

Numerically equivalent to the official ``MambaVision`` (NVlabs/MambaVision), checked against fixtures
produced by the official code. The network, at strides 4 / 8 / 16 / 32:

* Stem: two 3x3 stride-2 convs (no bias), each followed by BatchNorm (eps 1e-4) and ReLU.
* Stages 0-1: residual conv blocks ``x + BN(conv(GELU_tanh(BN(conv(x)))))``.
* Stages 2-3: the NCHW map is zero-padded at the bottom/right to a multiple of the stage's window,
  cut into windows (row-major tokens inside a window, windows row-major), and every block runs on
  ``(B * windows, window * window, C)``; the map is put back and cropped. Padding tokens are not masked
  (as officially): they go through the blocks and reach real tokens through attention and the scan.
  The first half of a stage's blocks mix with :class:`MambaVisionMixer`, the rest with multi-head
  self-attention; each block is ``x + ls1 * mixer(LN(x))`` then ``x + ls2 * Mlp(LN(x))``.
* Stages 1-3 start with a 3x3 stride-2 conv (no bias, no norm) that doubles the width.
* Head: BatchNorm2d over the final map, global average pool, Linear.

The mixer is a non-causal Mamba: ``in_proj`` splits into halves ``x`` and ``z``; each goes through a
depthwise conv1d with symmetric ('same') padding and SiLU; only ``x`` is scanned (one forward scan over
the window's tokens) and the scan output is concatenated with ``z`` (not multiplied) before
``out_proj``. As officially, ``dt_proj``'s bias is applied by the Linear and again as the scan's
``delta_bias``. The SSM maths (init, dt/B/C projection, fp32 rule, the scan over
:func:`zoo.ops.selective_scan`, compiled kernels when built) comes from :mod:`zoo.layers.ssm`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, ClassifierHead, DropPath, LayerScale, LayerScale2d, Mlp
from timm.models import generate_default_cfgs, register_model

from ..checkpoint import extract_state_dict, load_pretrained_file
from ..layers.conv import StridedConv2d
from ..layers.helpers import channels_last
from ..layers.linear import Linear, use_zoo_linear_
from ..layers.ssm import (
    ScanInputs,
    dt_bc_projection,
    init_dt_bias_,
    init_dt_proj_weight_,
    s4d_real_A_log,
    scan,
    ssm_parameters,
)
from ._hierarchical import (
    HierarchicalMixin, create_hierarchical, hierarchical_cfg, init_weights_trunc_normal, raise_official_problems,
    run_blocks, stage_widths,
)

__all__ = [
    "MambaVision",
    "MambaVisionMixer",
    "attention_block_indices",
    "checkpoint_filter_fn",
    "from_official_kwargs",
    "official_kwargs_to_model_args",
    "window_partition",
    "window_reverse",
]

NUM_CONV_STAGES = 2  # stages 0 and 1 are convolutional, the rest hybrid (fixed by the architecture)


def attention_block_indices(depth: int) -> Tuple[int, ...]:
    """Which blocks of a hybrid stage of ``depth`` blocks use self-attention (the later half, as officially)."""
    first = depth // 2 + 1 if depth % 2 else depth // 2
    return tuple(range(first, depth))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W), H and W multiples of ``window`` -> (B * windows, window * window, C).

    Windows are ordered row-major over the map and tokens row-major inside each window.
    """
    batch, channels, height, width = x.shape
    x = x.view(batch, channels, height // window, window, width // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * windows, window * window, C) -> (B, C, H, W)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, height, width)


# --- blocks ----------------------------------------------------------------------------------------


class MambaVisionMixer(nn.Module):
    """Non-causal Mamba token mixer on (B, L, C): SSM branch and conv-only branch, concatenated.

    Args:
        dim: token width C. d_state: SSM state size. d_conv: depthwise conv1d kernel ('same' padding).
        expand: inner width ``expand * dim``, split in half between the SSM and the conv-only branch.
        dt_rank: rank of the delta projection ('auto' = ceil(dim / 16)).
        conv_bias: bias of the two conv1d (the released models have none). bias: in/out projection bias.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 8,
        d_conv: int = 3,
        expand: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        conv_bias: bool = False,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        d_inner = int(expand * dim)
        if d_inner % 2:
            raise ValueError(f"MambaVisionMixer: expand * dim = {d_inner} must be even (it is split in two halves)")
        self.d_state = d_state
        self.d_half = half = d_inner // 2
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = Linear(dim, d_inner, bias=bias)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=conv_bias)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=conv_bias)
        self.x_proj = Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(self.dt_rank, half, bias=True)
        self.A_log = nn.Parameter(torch.empty(half, d_state))
        self.D = nn.Parameter(torch.empty(half))
        self.out_proj = Linear(d_inner, dim, bias=bias)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, dt bias = softplus^-1(LogUniform[dt_min, dt_max]).

        :class:`MambaVision` re-initialises every Linear afterwards (dt_proj included), as the official model.
        """
        dt_min, dt_max, floor = self._dt_init
        init_dt_proj_weight_(self.dt_proj.weight, self.dt_rank)
        init_dt_bias_(self.dt_proj.bias, dt_min, dt_max, floor)
        self.A_log.copy_(s4d_real_A_log(self.d_half, self.d_state))
        self.D.fill_(1.0)

    def _ssm(self, x: torch.Tensor) -> torch.Tensor:
        """The selective scan of the SSM branch over x (B, d_half, L)."""
        delta, B, C = dt_bc_projection(x.transpose(1, 2), self.x_proj.weight, self.dt_proj.weight, self.d_state,
                                       tokens_last=True)
        # as officially, dt_proj's bias is added by the Linear and again by the scan (delta_bias)
        delta = delta + self.dt_proj.bias.to(delta.dtype)[:, None]
        A, D, delta_bias = ssm_parameters(self.A_log, self.D, self.dt_proj.bias)
        return scan(ScanInputs(x, delta.contiguous(), A, B, C, D, delta_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, L, C)."""
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        y = torch.cat([self._ssm(x).to(z.dtype), z], dim=1)
        return self.out_proj(y.transpose(1, 2))


class ConvBlock(nn.Module):
    """``x + ls(BN(conv3x3(GELU_tanh(BN(conv3x3(x))))))`` on (B, C, H, W)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: Optional[float] = None, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.ls = LayerScale2d(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return x + self.drop_path(self.ls(y))


class MambaVisionBlock(nn.Module):
    """``x + ls1 * mixer(LN(x))`` then ``x + ls2 * Mlp(LN(x))`` on (B, L, C); the mixer is a
    :class:`MambaVisionMixer` or multi-head self-attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        use_attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
        norm_eps: float = 1e-5,
        **mixer_kwargs: Any,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if use_attention:
            self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                   attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=nn.LayerNorm)
        else:
            self.mixer = MambaVisionMixer(dim, **mixer_kwargs)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        if use_attention:  # timm's Attention (qkv, proj) and Mlp: the zoo's CPU tiles where faster
            use_zoo_linear_(self.mixer)
        use_zoo_linear_(self.mlp)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.mixer(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class MambaVisionStage(nn.Module):
    """Optional stride-2 conv (doubling the width), then conv blocks or windowed hybrid blocks; NCHW."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        conv: bool,
        window_size: int,
        num_heads: int,
        drop_path: Sequence[float],
        layer_scale: Optional[float] = None,
        layer_scale_conv: Optional[float] = None,
        **block_kwargs: Any,
    ):
        super().__init__()
        if window_size < 1:
            raise ValueError(f"MambaVisionStage: window_size must be >= 1, got {window_size}")
        self.downsample = StridedConv2d(in_dim, dim, 3, stride=2, padding=1, bias=False) if downsample else nn.Identity()
        self.conv = conv
        self.window_size = window_size
        if conv:
            blocks = [ConvBlock(dim, drop_path[i], layer_scale_conv) for i in range(depth)]
        else:
            attention = attention_block_indices(depth)
            blocks = [
                MambaVisionBlock(dim, num_heads, i in attention, drop_path=drop_path[i], layer_scale=layer_scale,
                                 **block_kwargs)
                for i in range(depth)
            ]
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.conv:
            return run_blocks(self.blocks, x, self.grad_checkpointing)
        height, width = x.shape[-2:]
        window = self.window_size
        pad_b, pad_r = (-height) % window, (-width) % window
        if pad_b or pad_r:  # zero-padded like the official code, and not masked
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = run_blocks(self.blocks, window_partition(x, window), self.grad_checkpointing)
        x = window_reverse(x, window, height + pad_b, width + pad_r)
        return x[:, :, :height, :width].contiguous() if (pad_b or pad_r) else x


class MambaVision(HierarchicalMixin, nn.Module):
    """MambaVision classifier / backbone: 2 conv stages, 2 windowed Mamba + attention stages.

    Args:
        depths: blocks per stage (4 stages). dims: width of stage 0 (doubled per stage) or one per stage.
        stem_width: width after the first stem conv (official ``in_dim``).
        window_size: window side per stage (only the hybrid stages 2 and 3 use it).
        num_heads: attention heads per stage. mlp_ratio: Mlp width ratio.
        d_state, d_conv, expand: mixer SSM state, conv1d kernel, inner expansion (released: 8, 3, 1).
        qkv_bias, qk_norm: attention qkv bias and per-head LayerNorm of q and k (official ``qk_scale``).
        layer_scale, layer_scale_conv: LayerScale init of hybrid / conv blocks (None: no LayerScale).
        proj_drop_rate: dropout in the Mlp and after attention (official ``drop_rate``).
        attn_drop_rate: attention dropout. drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (1, 3, 8, 4),
        dims: Union[int, Sequence[int]] = 80,
        stem_width: int = 32,
        window_size: Sequence[int] = (8, 8, 14, 7),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        d_state: int = 8,
        d_conv: int = 3,
        expand: float = 1.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        layer_scale: Optional[float] = None,
        layer_scale_conv: Optional[float] = None,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = stage_widths(dims, depths, "MambaVision")
        for name, values in (("window_size", window_size), ("num_heads", num_heads)):
            if len(values) != num_stages:
                raise ValueError(f"MambaVision: got {len(values)} {name} for {num_stages} stages "
                                 f"(depths={tuple(depths)})")
        if num_stages <= NUM_CONV_STAGES:
            raise ValueError(f"MambaVision: needs more than {NUM_CONV_STAGES} stages (the first "
                             f"{NUM_CONV_STAGES} are convolutional), got depths={tuple(depths)}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.dims = dims
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            StridedConv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width, eps=1e-4),
            nn.ReLU(),
            StridedConv2d(stem_width, dims[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dims[0], eps=1e-4),
            nn.ReLU(),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # official values, meta-safe
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            stages.append(MambaVisionStage(
                in_dim=dims[max(i - 1, 0)], dim=dims[i], depth=depth, downsample=i > 0, conv=i < NUM_CONV_STAGES,
                window_size=int(window_size[i]), num_heads=int(num_heads[i]),
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], layer_scale=layer_scale,
                layer_scale_conv=layer_scale_conv, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_eps=norm_eps,
                d_state=d_state, d_conv=d_conv, expand=expand,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as officially: every Linear (the mixer's dt_proj too) truncated-normal, zero bias
        init_weights_trunc_normal(m, (nn.LayerNorm, nn.BatchNorm2d))

    # timm API from HierarchicalMixin: NCHW stages, a final BatchNorm2d, an NCHW ClassifierHead
    stem_name = "stem"
    stage_fmt = "NCHW"
    no_weight_decay_suffixes = (".A_log", ".D")  # the mixers' A (log) and D, as in Mamba

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MambaVision: expected an image batch of shape (B, {self.in_chans}, H, W), got {shape}")

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W), checked -> the stem's map at stride 4, (B, C, H, W) stored channels-last (the conv
        stages keep that order, and stages 2-3 flatten it to contiguous (B, L, C) tokens)."""
        self._check_input(x)
        return self.stem(channels_last(x))

    # --- checkpoints ----------------------------------------------------------------------------

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Loads an official (``.pth.tar`` with pickled training args) or zoo checkpoint file safely.

        Classifier weights are skipped when their shape does not fit this model's head, as timm does.
        """
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn, classifier="head.fc", strict=strict)


# --- official checkpoints and constructor kwargs ---------------------------------------------------

_OFFICIAL_PREFIXES = (
    ("patch_embed.conv_down.", "stem."),
    ("head.", "head.fc."),
)
_BLOCK_RENAMES = (
    ("gamma_1", "ls1.gamma"),
    ("gamma_2", "ls2.gamma"),
    ("gamma", "ls.gamma"),
)


def _map_official_key(key: str) -> str:
    """One official ``MambaVision`` state-dict key -> this module's name (unknown keys are returned unchanged)."""
    for old, new in _OFFICIAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "levels" or not parts[1].isdigit():
        return key
    level = int(parts[1])
    if parts[2:4] == ["downsample", "reduction"] and len(parts) == 6:
        # the official level i ends with the conv that our stage i + 1 starts with
        return f"stages.{level + 1}.downsample.{parts[5]}"
    if parts[2] == "blocks" and len(parts) >= 5:
        rest = ".".join(parts[4:])
        rest = dict(_BLOCK_RENAMES).get(rest, rest)
        return f"stages.{level}.blocks.{parts[3]}.{rest}"
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Converts an official MambaVision checkpoint to this module's names.

    Accepts the released training checkpoints (weights under ``state_dict``, or ``model``), a bare official
    state dict (``module.`` and, as the official loader does, ``encoder.`` prefixes stripped), or a zoo
    state dict (returned as is). Non-tensor entries are dropped.
    """
    state_dict = extract_state_dict(state_dict)
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    if sorted(state_dict)[0].startswith("encoder"):  # the official loader keeps only the encoder's keys
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return {_map_official_key(k): v for k, v in state_dict.items()}


# accepted and without effect (the official class swallows them; timm adds img_size)
_OFFICIAL_IGNORED = ("resolution", "img_size", "model_path", "pretrained_cfg", "pretrained_cfg_overlay")


def _layer_scale(name: str, value: Any, problems: List[str]) -> Optional[float]:
    # the official blocks use LayerScale only for a plain int or float value; anything else means none
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        if value not in (None, False):
            problems.append(f"{name}={value!r} (accepted: None or a number)")
        return None
    return float(value)


def official_kwargs_to_model_args(**kwargs: Any) -> Dict[str, Any]:
    """Maps the official ``MambaVision(**kwargs)`` arguments to :class:`MambaVision` arguments.

    Raises a ValueError naming every unknown kwarg or value this implementation does not reproduce.
    """
    kwargs = dict(kwargs)
    problems: List[str] = []
    for name in _OFFICIAL_IGNORED:
        kwargs.pop(name, None)
    missing = [k for k in ("dim", "in_dim", "depths", "window_size", "mlp_ratio", "num_heads") if k not in kwargs]
    if missing:
        problems.append(f"missing required kwargs {missing}")
    depths = list(kwargs.pop("depths", []))
    if len(depths) != 4:
        problems.append(f"depths={depths!r} (the official model has 4 levels)")
    args: Dict[str, Any] = dict(
        depths=tuple(depths),
        dims=int(kwargs.pop("dim", 0)),
        stem_width=int(kwargs.pop("in_dim", 0)),
        window_size=tuple(int(w) for w in kwargs.pop("window_size", [])),
        mlp_ratio=float(kwargs.pop("mlp_ratio", 4)),
        num_heads=tuple(int(h) for h in kwargs.pop("num_heads", [])),
        drop_path_rate=float(kwargs.pop("drop_path_rate", 0.2)),
        in_chans=int(kwargs.pop("in_chans", 3)),
        num_classes=int(kwargs.pop("num_classes", 1000)),
        qkv_bias=bool(kwargs.pop("qkv_bias", True)),
        qk_norm=bool(kwargs.pop("qk_scale", None)),  # official qk_scale switches on q/k LayerNorm
        proj_drop_rate=float(kwargs.pop("drop_rate", 0.0)),
        attn_drop_rate=float(kwargs.pop("attn_drop_rate", 0.0)),
        layer_scale=_layer_scale("layer_scale", kwargs.pop("layer_scale", None), problems),
        layer_scale_conv=_layer_scale("layer_scale_conv", kwargs.pop("layer_scale_conv", None), problems),
    )
    raise_official_problems("MambaVision", kwargs, problems)
    return args


def from_official_kwargs(**kwargs: Any) -> MambaVision:
    """Builds :class:`MambaVision` from the official constructor kwargs (as recorded in fixtures).

    Load official weights with ``model.load_state_dict(checkpoint_filter_fn(sd, model))``.
    """
    return MambaVision(**official_kwargs_to_model_args(**kwargs))


# --- registration ---------------------------------------------------------------------------------


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaVision:
    # released files pickle the training args next to the weights: local files go through load_pretrained
    return create_hierarchical(MambaVision, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return hierarchical_cfg(url, **{
        "crop_pct": 1.0,
        "crop_mode": "center",
        "first_conv": "stem.0",
        # released as timm training checkpoints that pickle argparse args: load through model.load_pretrained
        "custom_load": bool(url),
        "license": "nvidia-source-code-license-nc",
        "paper_ids": "arXiv:2407.08083",
        "paper_name": "MambaVision: A Hybrid Mamba-Transformer Vision Backbone",
        "origin_url": "https://github.com/NVlabs/MambaVision",
        **kwargs,
    })


_HF = "https://huggingface.co/nvidia/MambaVision-{}-1K/resolve/main/mambavision_{}_1k.pth.tar"
default_cfgs = generate_default_cfgs({
    "mambavision_tiny.in1k": _cfg(_HF.format("T", "tiny")),
    "mambavision_tiny2.in1k": _cfg(_HF.format("T2", "tiny2"), crop_pct=0.98),
    "mambavision_small.in1k": _cfg(_HF.format("S", "small"), crop_pct=0.93),
    "mambavision_base.in1k": _cfg(_HF.format("B", "base")),
    "mambavision_large.in1k": _cfg(_HF.format("L", "large")),
    "mambavision_large2.in1k": _cfg(_HF.format("L2", "large2")),
    "test_mambavision.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _register(variant: str, pretrained: bool, args: Dict[str, Any], kwargs: Dict[str, Any]) -> MambaVision:
    return _create_mambavision(variant, pretrained, **dict(args, **kwargs))


@register_model
def mambavision_tiny(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-T: 31.8M params, 4.4 GFLOPs, 82.3% ImageNet-1k top-1."""
    args = dict(depths=(1, 3, 8, 4), dims=80, stem_width=32, num_heads=(2, 4, 8, 16))
    return _register("mambavision_tiny", pretrained, args, kwargs)


@register_model
def mambavision_tiny2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-T2: 35.1M params, 5.1 GFLOPs, 82.7% ImageNet-1k top-1."""
    args = dict(depths=(1, 3, 11, 4), dims=80, stem_width=32, num_heads=(2, 4, 8, 16))
    return _register("mambavision_tiny2", pretrained, args, kwargs)


@register_model
def mambavision_small(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-S: 50.1M params, 7.5 GFLOPs, 83.3% ImageNet-1k top-1."""
    args = dict(depths=(3, 3, 7, 5), dims=96, stem_width=64, num_heads=(2, 4, 8, 16))
    return _register("mambavision_small", pretrained, args, kwargs)


@register_model
def mambavision_base(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-B: 97.7M params, 15.0 GFLOPs, 84.2% ImageNet-1k top-1."""
    args = dict(depths=(3, 3, 10, 5), dims=128, stem_width=64, num_heads=(2, 4, 8, 16), layer_scale=1e-5)
    return _register("mambavision_base", pretrained, args, kwargs)


@register_model
def mambavision_large(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L: 227.9M params, 34.9 GFLOPs, 85.0% ImageNet-1k top-1."""
    args = dict(depths=(3, 3, 10, 5), dims=196, stem_width=64, num_heads=(4, 8, 16, 32), layer_scale=1e-5)
    return _register("mambavision_large", pretrained, args, kwargs)


@register_model
def mambavision_large2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L2: 241.5M params, 37.5 GFLOPs, 85.3% ImageNet-1k top-1."""
    args = dict(depths=(3, 3, 12, 5), dims=196, stem_width=64, num_heads=(4, 8, 16, 32), layer_scale=1e-5)
    return _register("mambavision_large2", pretrained, args, kwargs)


@register_model
def test_mambavision(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """Test-sized MambaVision: widths 16..128, 1 conv block per conv stage, a Mamba and an attention block
    per hybrid stage, windows 3 and 2 (64 px: the stride-16 map 4x4 is padded to 6x6)."""
    args = dict(depths=(1, 1, 2, 2), dims=16, stem_width=8, window_size=(8, 8, 3, 2), num_heads=(1, 2, 2, 4))
    return _register("test_mambavision", pretrained, args, kwargs)
