"""VMamba (Liu et al. 2024, "VMamba: Visual State Space Model", arXiv:2401.10166) as timm models.

Numerically equivalent to the official ``VSSM`` (MzeroMiko/VMamba, ``classification/models/vmamba.py``)
for the released configurations, checked against fixtures produced by the official code:

* v0 ("vanilla" VMamba, ``forward_type='v0'``): blocks ``x + SS2D(LN(x))`` only (no MLP), SS2D with the
  SiLU gate ``z``, d_state 16; 4x4 patch stem; Swin PatchMerging between stages.
* v2 / current (``forward_type='v05_noz'``): ``x + SS2D(LN(x))`` then ``x + MLP(LN(x))``; SS2D without
  the gate, d_state 1; a two-conv stem (3x3 stride 2 twice) and 3x3 stride-2 conv downsampling.

SS2D (the "2-D selective scan"): ``in_proj`` -> (x, z) -> depthwise conv on x -> activation -> the map
is read in four orders (row-major, column-major and their reverses), each order with its own
``x_proj`` (dt, B, C) / ``dt_proj`` / A / D; the four scans are independent (one grouped call of
:func:`zoo.ops.selective_scan` over ``4 * d_inner`` channels), their outputs are put back on their pixels
and summed, then ``out_norm`` (LayerNorm), times the gate, ``out_proj``. ``dt_rank = ceil(C / 16)``.

Everything runs channels-last (B, H, W, C) internally, whatever the official ``norm_layer`` layout
('ln' is channels-last, 'ln2d' channels-first: both are a LayerNorm over C). The SSM maths (init, fp32
rule, projections, cross scan/merge, the scan call) comes from :mod:`zoo.layers.ssm`.
"""
from __future__ import annotations

import math
import os
import re
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, GluMlp, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from ..checkpoint import STATE_DICT_KEYS, extract_state_dict, load_pretrained_file
from ..layers.conv import StridedConv2d
from ..layers.helpers import channels_last
from ..layers.linear import Linear, use_zoo_linear_
from ..layers.ssm import (
    ScanInputs,
    cross_merge_2d,
    cross_scan_2d,
    dt_bc_projection_stacked,
    fp32_or_wider,
    init_stacked_ssm_,
    scan,
    ssm_parameters,
)
from ..ops.mixer import fused_mixer_enabled, in_image_chunks, rows_projection
from ..ops.multi_direction import COLUMN_MAJOR, COLUMN_MAJOR_REVERSED, ROW_MAJOR, ROW_MAJOR_REVERSED, scan_order_indices
from ._hierarchical import (
    HierarchicalMixin, create_hierarchical, hierarchical_cfg, init_weights_trunc_normal, raise_official_problems,
    rename_vmamba_legacy, run_blocks, stage_widths,
)

__all__ = [
    "VMamba",
    "VSSBlock",
    "SS2D",
    "SCAN_MODES",
    "checkpoint_filter_fn",
    "from_official_kwargs",
    "official_kwargs_to_model_args",
]

# traversal orders per official scan mode; entry k uses the k-th slot of the stacked SSM parameters
SCAN_MODES: Dict[str, Tuple[str, ...]] = {
    "cross2d": (ROW_MAJOR, COLUMN_MAJOR, ROW_MAJOR_REVERSED, COLUMN_MAJOR_REVERSED),
    "unidi": (ROW_MAJOR,) * 4,
    "bidi": (ROW_MAJOR, ROW_MAJOR, ROW_MAJOR_REVERSED, ROW_MAJOR_REVERSED),
}
_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _activation(name: str) -> type:
    try:
        return _ACTIVATIONS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(map(repr, _ACTIVATIONS))}") from None


# --- blocks -------------------------------------------------------------------------------------------


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (keeps the official Sequential indices of the out norms)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class SpatialSoftmax(nn.Module):
    """Softmax over the pixels of each channel of a channels-last map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2).softmax(dim=1).view_as(x)


OUT_NORMS = ("ln", "none", "sigmoid", "softmax", "dwconv3", "cnorm")


def _make_out_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """SS2D's output normalisation on (B, H, W, D); module indices as the official Sequentials."""
    def dwconv3() -> nn.Module:
        return nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)

    if kind == "ln":
        return nn.LayerNorm(dim, eps=eps)
    if kind in ("none", "sigmoid", "softmax"):
        return {"none": nn.Identity, "sigmoid": nn.Sigmoid, "softmax": SpatialSoftmax}[kind]()
    if kind == "dwconv3":
        return nn.Sequential(Permute(0, 3, 1, 2), dwconv3(), Permute(0, 2, 3, 1))
    if kind == "cnorm":
        return nn.Sequential(nn.LayerNorm(dim, eps=eps), Permute(0, 3, 1, 2), dwconv3(), Permute(0, 2, 3, 1))
    raise ValueError(f"SS2D: unknown out_norm {kind!r}; accepted: {', '.join(map(repr, OUT_NORMS))}")


class SS2D(nn.Module):
    """The 2-D selective-scan mixer on channels-last maps (official ``SS2D``, v0 and v2 forward types).

    Args:
        dim: channels in and out. d_state: SSM state size. ssm_ratio: inner width = ssm_ratio * dim.
        dt_rank: rank of the delta projection ('auto' = ceil(dim / 16)).
        act_layer: activation after the depthwise conv (and of the gate).
        conv_kernel: depthwise conv size; < 2 disables the conv. gate: the z branch (``in_proj`` gives
            2 * d_inner); gate_act: apply ``act_layer`` to z. out_act: GELU after ``out_norm``.
        out_norm: one of :data:`OUT_NORMS`: 'ln' (LayerNorm over channels), 'none', 'sigmoid', 'softmax'
            (over pixels), 'dwconv3' (3x3 depthwise conv), 'cnorm' (LayerNorm then 3x3 depthwise conv).
        scan_mode: traversal orders, a key of :data:`SCAN_MODES`.
        force_fp32: half-precision scan inputs upcast to float32 (official v0/v2; matters under autocast).
        init: SSM parameter init: 'v0' (Mamba's), 'v1' / 'v2' (the official "simple" inits).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: Union[int, str] = "auto",
        act_layer: type = nn.SiLU,
        conv_kernel: int = 3,
        conv_bias: bool = True,
        gate: bool = True,
        gate_act: bool = True,
        out_act: bool = False,
        out_norm: str = "ln",
        scan_mode: str = "cross2d",
        force_fp32: bool = True,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-5,
        init: str = "v0",
    ):
        super().__init__()
        if scan_mode not in SCAN_MODES:
            raise ValueError(f"SS2D: unknown scan_mode {scan_mode!r}; accepted: {', '.join(map(repr, SCAN_MODES))}")
        if conv_kernel >= 2 and conv_kernel % 2 == 0:
            raise ValueError(f"SS2D: conv_kernel must be odd (or < 2 for no conv), got {conv_kernel}")
        if init not in ("v0", "v1", "v2"):
            raise ValueError(f"SS2D: unknown init {init!r}; accepted: 'v0', 'v1', 'v2'")
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = int(d_state)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = SCAN_MODES[scan_mode]
        self.gate, self.gate_act, self.force_fp32 = gate, gate_act, force_fp32
        # the channels-last CPU inference path fuses a SiLU after the depthwise conv (VMamba's default)
        self.rows_layout = conv_kernel >= 2 and act_layer is nn.SiLU
        num_dirs = len(self.orders)

        self.in_proj = Linear(dim, 2 * d_inner if gate else d_inner, bias=False)
        self.act = act_layer()
        self.conv = nn.Conv2d(
            d_inner, d_inner, conv_kernel, padding=(conv_kernel - 1) // 2, groups=d_inner, bias=conv_bias,
        ) if conv_kernel >= 2 else nn.Identity()
        # per direction: token -> (dt_rank + 2 * d_state), dt_rank -> d_inner, and A, D, dt bias
        self.x_proj_weight = nn.Parameter(torch.empty(num_dirs, self.dt_rank + 2 * self.d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(num_dirs, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(num_dirs, d_inner))
        self.A_logs = nn.Parameter(torch.empty(num_dirs * d_inner, self.d_state))
        self.Ds = nn.Parameter(torch.empty(num_dirs * d_inner))
        self.out_norm = _make_out_norm(out_norm, d_inner, norm_eps)
        self.out_act = nn.GELU() if out_act else nn.Identity()
        self.out_proj = Linear(d_inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.init = init
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """'v0': Mamba's init (S4D-real A, D = 1, dt bias = softplus^-1(LogUniform[1e-3, 0.1])); 'v1'/'v2':
        the official "simple" inits (A_logs normal / zero, small random dt projection and bias)."""
        if self.init == "v0":
            init_stacked_ssm_(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)
            return
        nn.init.uniform_(self.x_proj_weight, -self.d_inner ** -0.5, self.d_inner ** -0.5)
        self.Ds.fill_(1.0)
        if self.init == "v1":
            self.A_logs.normal_()
            self.dt_projs_weight.normal_().mul_(0.1)
            self.dt_projs_bias.normal_().mul_(0.1)
        else:
            self.A_logs.zero_()
            self.dt_projs_weight.uniform_().mul_(0.1)
            self.dt_projs_bias.uniform_().mul_(0.1)

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_inner, H, W) -> (B, d_inner, H*W): the K direction scans, merged back row-major."""
        batch, _, height, width = x.shape
        xs = cross_scan_2d(x, self.orders)  # (B, K, D, L)
        delta, B, C = dt_bc_projection_stacked(xs, self.x_proj_weight, self.dt_projs_weight, self.d_state)
        if self.force_fp32 and xs.dtype in (torch.float16, torch.bfloat16):
            xs, delta, B, C = (fp32_or_wider(t) for t in (xs, delta, B, C))
        A, D, delta_bias = ssm_parameters(self.A_logs, self.Ds, self.dt_projs_bias.flatten())
        # one scan over K * D channels, one group of B/C per direction
        ys = scan(ScanInputs(xs.flatten(1, 2), delta.flatten(1, 2), A, B, C, D, delta_bias))
        return cross_merge_2d(ys.view(batch, len(self.orders), self.d_inner, -1), height, width, self.orders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if not torch.jit.is_scripting():  # TorchScript and FX tracing keep the reference layout
            if self.rows_layout and fused_mixer_enabled(x, "scan_cross"):  # CPU inference, same result
                return in_image_chunks(self._forward_rows, x, x.shape[1] * x.shape[2] * self.d_inner)
        batch, height, width, _ = x.shape
        x = self.in_proj(x)
        z = x
        if self.gate:
            x, z = x.chunk(2, dim=-1)
            if self.gate_act:
                z = self.act(z)
        x = self.act(self.conv(x.permute(0, 3, 1, 2)))
        y = self._scan(x).transpose(1, 2).reshape(batch, height, width, self.d_inner)
        return self._output(y, z, x.dtype)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Scan output (B, H, W, d_inner) -> out_norm, out_act, the z gate, out_proj."""
        norm_weight = next(self.out_norm.parameters(), None)
        if norm_weight is not None:  # an fp32 scan output meets bf16 weights in a bf16 model
            y = y.to(norm_weight.dtype)
        y = self.out_act(self.out_norm(y)).to(dtype)
        if self.gate:
            y = y * z
        return self.proj_drop(self.out_proj(y))

    @torch.jit.unused
    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward on channels-last maps and (B, L, C) rows (``zoo_scan::depthwise_conv2d_silu``
        and ``zoo_scan::scan_cross``, see zoo/ops/mixer.py): no cross-scan copies, flips or transposes."""
        batch, height, width, _ = x.shape
        d, k, rank, n = self.d_inner, len(self.orders), self.dt_rank, self.d_state
        x = self.in_proj(x)
        z = x
        if self.gate:
            x, z = x[..., :d], x[..., d:]
            if self.gate_act:
                z = self.act(z)
        rows = torch.ops.zoo_scan.depthwise_conv2d_silu(x, self.conv.weight, self.conv.bias, 1).view(batch, -1, d)
        proj = rank + 2 * n
        # every direction's projection on the row-major tokens (it is per token, so order does not matter)
        x_dbl = rows_projection(rows.reshape(1, -1, d), self.x_proj_weight.reshape(1, k * proj, d))
        x_dbl = x_dbl.view(batch, -1, k, proj)
        A, D, delta_bias = ssm_parameters(self.A_logs, self.Ds, self.dt_projs_bias)
        index = scan_order_indices(self.orders, height, width)
        # dt_proj runs inside the scan (dt_weight) on each direction's rank-R slice: (K, B, L, R), strided
        y = torch.ops.zoo_scan.scan_cross(rows, x_dbl[..., :rank].permute(2, 0, 1, 3), A.view(k, d, n),
                                          x_dbl[..., rank:rank + n], x_dbl[..., rank + n:], D.view(k, d), delta_bias,
                                          index, True, self.dt_projs_weight)
        return self._output(y.view(batch, height, width, d), z, x.dtype)


class VSSBlock(nn.Module):
    """``x + SS2D(norm(x))`` (when ssm_ratio > 0), then ``x + MLP(norm2(x))`` (when mlp_ratio > 0); NHWC."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        norm_layer: type = nn.LayerNorm,
        ssm_ratio: float = 2.0,
        mlp_ratio: float = 4.0,
        mlp_act_layer: type = nn.GELU,
        mlp_drop: float = 0.0,
        gated_mlp: bool = False,
        **ssm_kwargs: Any,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim) if ssm_ratio > 0 else None
        self.mixer = SS2D(dim, ssm_ratio=ssm_ratio, **ssm_kwargs) if ssm_ratio > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = self.mlp = None
        if mlp_ratio > 0:
            hidden = int(dim * mlp_ratio)
            self.norm2 = norm_layer(dim)
            if gated_mlp:  # official gMlp: fc1 -> (x, z) -> fc2(x * act(z))
                self.mlp = GluMlp(dim, 2 * hidden, act_layer=mlp_act_layer, drop=mlp_drop)
            else:
                self.mlp = Mlp(dim, hidden, act_layer=mlp_act_layer, drop=mlp_drop)
            use_zoo_linear_(self.mlp)  # timm's layers; fc1 / fc2 then run on the zoo's CPU tiles where faster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            x = x + self.drop_path(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class BatchNormNHWC(nn.BatchNorm2d):
    """BatchNorm over the channels of a channels-last map (the official ``norm_layer='bn'``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvDownsample(nn.Module):
    """Stride-2 conv (2x2, or 3x3 padded: odd sides round up) then norm; channels-last in and out."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, norm_layer: type):
        super().__init__()
        self.conv = StridedConv2d(in_dim, out_dim, kernel_size, stride=2, padding=(kernel_size - 1) // 2)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class VMambaStage(nn.Module):
    """Optional downsample (stride 2) followed by blocks; channels-last in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: Optional[str], drop_path: Sequence[float],
                 norm_layer: type, **block_kwargs: Any):
        super().__init__()
        if downsample is None:
            self.downsample = nn.Identity()
        elif downsample == "merge":
            self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer)
        else:
            self.downsample = ConvDownsample(in_dim, dim, {"conv2": 2, "conv3": 3}[downsample], norm_layer)
        self.blocks = nn.Sequential(*[
            VSSBlock(dim, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs) for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


class PatchEmbed(nn.Module):
    """Stem to channels-last (B, H/4, W/4, C): 'patch' = one 4x4 stride-4 conv + norm (official v1);
    'conv2' = 3x3 stride-2 conv (C/2) + norm + GELU + 3x3 stride-2 conv + norm (official v2)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, stem: str = "patch", norm_layer: type = nn.LayerNorm,
                 patch_norm: bool = True, pos_embed_grid: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.in_chans, self.patch_size, self.stem = in_chans, patch_size, stem
        make_norm = (lambda c: norm_layer(c)) if patch_norm else (lambda c: nn.Identity())
        if stem == "patch":
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
            self.norm = make_norm(dim)
        elif stem == "conv2":
            stride = patch_size // 2
            self.conv1 = StridedConv2d(in_chans, dim // 2, stride + 1, stride=stride, padding=1)
            self.norm1 = make_norm(dim // 2)
            self.act = nn.GELU()
            self.conv2 = StridedConv2d(dim // 2, dim, stride + 1, stride=stride, padding=1)
            self.norm2 = make_norm(dim)
        else:
            raise ValueError(f"PatchEmbed: unknown stem {stem!r}; accepted: 'patch', 'conv2'")
        self.pos_embed = None
        if pos_embed_grid is not None:  # learned, for the official img_size grid
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *pos_embed_grid))
            trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-2] < patch or x.shape[-1] < patch:
            raise ValueError(
                f"VMamba: expected an image batch of shape (B, {self.in_chans}, H, W) with H and W "
                f">= {patch} (the stem patch size), got {tuple(x.shape)}")
        if self.stem == "patch":
            x = self.norm(self.proj(channels_last(x)).permute(0, 2, 3, 1))
        else:
            x = self.norm1(self.conv1(channels_last(x)).permute(0, 2, 3, 1))
            x = self.act(x.permute(0, 3, 1, 2))
            x = self.norm2(self.conv2(x).permute(0, 2, 3, 1))
        if self.pos_embed is None:
            return x
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[1:3]:  # another input size: resize the learned grid
            pos = F.interpolate(pos, size=x.shape[1:3], mode="bicubic", align_corners=False)
        return x + pos.permute(0, 2, 3, 1)


def _norm_layer(name: str, eps: float) -> type:
    name = str(name).lower()
    if name in ("ln", "ln2d"):  # the same LayerNorm over C; 'ln2d' only changes the official layout
        return partial(nn.LayerNorm, eps=eps)
    if name == "bn":
        return BatchNormNHWC
    raise ValueError(f"VMamba: unknown norm_layer {name!r}; accepted: 'ln', 'ln2d', 'bn'")


class VMamba(HierarchicalMixin, nn.Module):
    """VMamba classifier / backbone (4 stages at strides 4, 8, 16, 32), channels-last inside.

    Args:
        depths: blocks per stage. dims: width of stage 0 (doubled per stage) or one width per stage.
        stem: 'patch' (4x4 conv, official v1) or 'conv2' (two 3x3 stride-2 convs, official v2).
        downsample: 'merge' (Swin PatchMerging, official v1), 'conv2' (2x2 conv, v2), 'conv3' (3x3 conv, v3).
        norm_layer: 'ln' / 'ln2d' (LayerNorm over channels) or 'bn' (BatchNorm).
        d_state, ssm_ratio, dt_rank: SSM state size, inner expansion (0: no SS2D branch), delta rank.
        ssm_act: activation of the conv branch and gate. conv_kernel: depthwise kernel (< 2: none).
        gate: the SiLU-gated z branch (v0: on; current release: off). gate_act, out_act, out_norm,
            scan_mode, force_fp32, ssm_init: see :class:`SS2D`.
        mlp_ratio: MLP width ratio (0: no MLP). gated_mlp: gated MLP. mlp_act: its activation.
        pos_embed: a learned absolute position embedding of the ``img_size`` grid, in the stem
            (resized bicubically for other input sizes).
        proj_drop_rate: dropout after SS2D's out_proj. mlp_drop_rate: MLP dropout. drop_rate: before
            the classifier. drop_path_rate: stochastic depth, linearly increasing over all blocks.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Union[int, Sequence[int]] = 96,
        patch_size: int = 4,
        patch_norm: bool = True,
        stem: str = "conv2",
        downsample: str = "conv3",
        norm_layer: str = "ln",
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        ssm_act: str = "silu",
        conv_kernel: int = 3,
        conv_bias: bool = False,
        gate: bool = False,
        gate_act: bool = True,
        out_act: bool = False,
        out_norm: str = "ln",
        scan_mode: str = "cross2d",
        force_fp32: bool = False,
        ssm_init: str = "v0",
        mlp_ratio: float = 4.0,
        mlp_act: str = "gelu",
        gated_mlp: bool = False,
        pos_embed: bool = False,
        img_size: Union[int, Tuple[int, int]] = 224,
        proj_drop_rate: float = 0.0,
        mlp_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        dims = stage_widths(dims, depths, "VMamba")
        if downsample not in ("merge", "conv2", "conv3"):
            raise ValueError(f"VMamba: unknown downsample {downsample!r}; accepted: 'merge', 'conv2', 'conv3'")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        norm = _norm_layer(norm_layer, norm_eps)

        pos_grid = None
        if pos_embed:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            pos_grid = (size[0] // patch_size, size[1] // patch_size)
        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size, stem, norm, patch_norm, pos_grid)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, 0 -> rate
        block_kwargs = dict(
            ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, mlp_act_layer=_activation(mlp_act), mlp_drop=mlp_drop_rate,
            gated_mlp=gated_mlp, d_state=d_state, dt_rank=dt_rank, act_layer=_activation(ssm_act),
            conv_kernel=conv_kernel, conv_bias=conv_bias, gate=gate, gate_act=gate_act, out_act=out_act,
            out_norm=out_norm, scan_mode=scan_mode, force_fp32=force_fp32, proj_drop=proj_drop_rate,
            norm_eps=norm_eps, init=ssm_init,
        )
        stages, self.feature_info = [], []
        stride = patch_size
        for i, depth in enumerate(depths):
            if i > 0:
                stride *= 2
            stages.append(VMambaStage(
                in_dim=dims[max(i - 1, 0)], dim=dims[i], depth=depth, downsample=downsample if i > 0 else None,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm, **block_kwargs,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC")
        self.apply(init_weights_trunc_normal)

    # timm API from HierarchicalMixin: NHWC stages, a final norm, an NHWC ClassifierHead
    stem_name = "patch_embed"
    stage_fmt = "NHWC"
    no_weight_decay_suffixes = (".A_logs", ".Ds", ".pos_embed")  # SSM A (log), D and the position embedding

    # --- checkpoints ----------------------------------------------------------------------------

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Loads an official or zoo checkpoint file safely (see :mod:`zoo.checkpoint`).

        Classifier weights are skipped when their shape does not fit this model's head (other
        ``num_classes``, or no head), as timm does for pretrained weights.
        """
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn, classifier="head.fc", strict=strict)


# --- official checkpoints and constructor kwargs ---------------------------------------------------

_BLOCK_RENAMES = (("norm.", "norm1."), ("op.conv2d.", "mixer.conv."), ("op.", "mixer."))
_STEM_V1 = {"0": "proj", "2": "norm"}
_STEM_V2 = {"0": "conv1", "2": "norm1", "5": "conv2", "7": "norm2"}
_DOWNSAMPLE_CONV = {"1": "conv", "3": "norm"}  # official v2/v3: Sequential(permute, conv, permute, norm)
_STEM_KEY = re.compile(r"^patch_embed\.(\d+)\.(.*)$")
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$")
_DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.(\w+)\.(.*)$")
# 1x1 "Linear2d" weights of channel-first official models may be stored as (out, in, 1, 1)
_LINEAR_WEIGHTS = ("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight", "reduction.weight")


def _map_official_key(key: str, stem: Mapping[str, str]) -> str:
    """One official ``VSSM`` state-dict key (legacy names already renamed) -> this module's name."""
    m = _STEM_KEY.match(key)
    if m and m.group(1) in stem:
        return f"patch_embed.{stem[m.group(1)]}.{m.group(2)}"
    if key == "pos_embed":
        return "patch_embed.pos_embed"
    if key.startswith("classifier.norm."):
        return "norm." + key[len("classifier.norm."):]
    if key.startswith("classifier.head."):
        return "head.fc." + key[len("classifier.head."):]
    m = _DOWNSAMPLE_KEY.match(key)
    if m:  # the official stage i ends with the downsample that our stage i + 1 starts with
        name = _DOWNSAMPLE_CONV.get(m.group(2), m.group(2))
        return f"stages.{int(m.group(1)) + 1}.downsample.{name}.{m.group(3)}"
    m = _BLOCK_KEY.match(key)
    if m:
        rest = m.group(3)
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"
    return key


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: Optional[nn.Module] = None, use_ema: bool = False
) -> Dict[str, torch.Tensor]:
    """Converts an official VMamba checkpoint to this module's names.

    Accepts the official training checkpoint (weights under ``model``; ``use_ema=True`` takes
    ``model_ema`` instead, and a dict with only ``model_ema`` is read from there), a bare official state
    dict (older checkpoints' names ``patch_embed.proj``, ``ln_1``, ``self_attention``, top-level
    ``norm``/``head`` included), or a zoo state dict (returned as is). Non-tensor entries are dropped;
    1x1-conv shaped (out, in, 1, 1) weights of linear layers are reshaped to (out, in).
    """
    if use_ema:
        if not isinstance(state_dict.get("model_ema"), Mapping):
            raise KeyError(f"use_ema=True but the checkpoint has no 'model_ema' entry (keys: {sorted(state_dict)[:8]})")
        state_dict = state_dict["model_ema"]
    state_dict = extract_state_dict(state_dict, keys=STATE_DICT_KEYS + ("model_ema",))
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    renamed = {rename_vmamba_legacy(k): v for k, v in state_dict.items()}
    stem = _STEM_V2 if "patch_embed.5.weight" in renamed else _STEM_V1
    out = {}
    for key, value in renamed.items():
        if key.endswith(_LINEAR_WEIGHTS) and value.ndim == 4 and value.shape[-2:] == (1, 1):
            value = value.flatten(1)
        out[_map_official_key(key, stem)] = value
    return out


# official forward_type postfixes, stripped from the end in the official order
_GATE_POSTFIXES = (("_no32", "no_fp32"), ("_oact", "out_act"), ("_noz", "no_gate"), ("_nozact", "no_gate_act"))
_OUT_NORM_POSTFIXES = (("_onnone", "none"), ("_ondwconv3", "dwconv3"), ("_oncnorm", "cnorm"),
                       ("_onsoftmax", "softmax"), ("_onsigmoid", "sigmoid"))
# v2-style forward types: (scan mode, scan inputs forced to fp32 unless '_no32')
_V2_FORWARD_TYPES = {
    "v01": ("cross2d", True), "v02": ("cross2d", True), "v03": ("cross2d", True), "v2": ("cross2d", True),
    "v04": ("cross2d", False), "v05": ("cross2d", False), "v3": ("cross2d", False),
    "v051d": ("unidi", False), "v052d": ("bidi", False),
}
_STEMS = {"v1": "patch", "v2": "conv2"}
_DOWNSAMPLES = {"v1": "merge", "v2": "conv2", "v3": "conv3"}


def _forward_type_args(forward_type: str, problems: List[str]) -> Dict[str, Any]:
    """The SS2D switches an official ``forward_type`` string selects (problems appended, not raised)."""
    if forward_type in ("v0", "v0seq"):  # SS2Dv0: gated, fp32 scan, fixed 3x3 biased conv + SiLU
        return dict(gate=True, gate_act=True, out_act=False, out_norm="ln", scan_mode="cross2d", force_fp32=True)
    rest, flags = forward_type, {}
    for tag, flag in _GATE_POSTFIXES:
        flags[flag] = rest.endswith(tag)
        rest = rest[:-len(tag)] if flags[flag] else rest
    out_norm = "ln"
    for tag, name in _OUT_NORM_POSTFIXES:
        if rest.endswith(tag):
            rest, out_norm = rest[:-len(tag)], name
    if rest not in _V2_FORWARD_TYPES:
        problems.append(f"forward_type={forward_type!r} (accepted: 'v0', 'v0seq', or one of "
                        f"{', '.join(map(repr, _V2_FORWARD_TYPES))}, then optionally one of "
                        f"{', '.join(t for t, _ in _OUT_NORM_POSTFIXES)}, then _nozact or _noz, _oact, _no32)")
        return {}
    scan_mode, fp32 = _V2_FORWARD_TYPES[rest]
    return dict(gate=not flags["no_gate"], gate_act=not flags["no_gate_act"], out_act=flags["out_act"],
                out_norm=out_norm, scan_mode=scan_mode, force_fp32=fp32 and not flags["no_fp32"])


def _choice(kwargs: Dict[str, Any], name: str, default: str, table: Mapping[str, str], problems: List[str]) -> str:
    value = kwargs.pop(name, default)
    if value not in table:
        problems.append(f"{name}={value!r} (accepted: {', '.join(map(repr, table))})")
        return table[default]
    return table[value]


def official_kwargs_to_model_args(**kwargs: Any) -> Dict[str, Any]:
    """Maps the official ``VSSM(**kwargs)`` arguments (defaults as officially) to :class:`VMamba` arguments.

    Raises a ValueError naming every value that selects behaviour this implementation does not
    reproduce (other forward types, ``downsample_version='none'``, ...), and unknown kwargs.
    """
    kwargs = dict(kwargs)
    problems: List[str] = []
    forward_type = str(kwargs.pop("forward_type", "v2"))
    args = _forward_type_args(forward_type, problems)
    norm_layer = str(kwargs.pop("norm_layer", "ln")).lower()
    if norm_layer not in ("ln", "ln2d", "bn"):
        problems.append(f"norm_layer={norm_layer!r} (accepted: 'ln', 'ln2d', 'bn')")
    ssm_act, conv_kernel = kwargs.pop("ssm_act_layer", "silu"), int(kwargs.pop("ssm_conv", 3))
    conv_bias, ssm_init = bool(kwargs.pop("ssm_conv_bias", True)), kwargs.pop("ssm_init", "v0")
    if forward_type in ("v0", "v0seq"):
        # SS2Dv0 hard-codes its conv, activation and init, and only runs channels-last
        ssm_act, conv_kernel, conv_bias, ssm_init = "silu", 3, True, "v0"
        if norm_layer != "ln":
            problems.append(f"forward_type={forward_type!r} needs norm_layer='ln' (the official v0 asserts it)")
    for name, value in (("ssm_act_layer", ssm_act), ("mlp_act_layer", kwargs.get("mlp_act_layer", "gelu"))):
        if str(value).lower() not in _ACTIVATIONS:
            problems.append(f"{name}={value!r} (accepted: {', '.join(map(repr, _ACTIVATIONS))})")
    if ssm_init not in ("v0", "v1", "v2"):
        problems.append(f"ssm_init={ssm_init!r} (accepted: 'v0', 'v1', 'v2')")
    kwargs.pop("use_checkpoint", None)  # training-time memory switch: set_grad_checkpointing() here
    args.update(
        stem=_choice(kwargs, "patchembed_version", "v1", _STEMS, problems),
        downsample=_choice(kwargs, "downsample_version", "v2", _DOWNSAMPLES, problems),
        norm_layer=norm_layer,
        depths=tuple(kwargs.pop("depths", [2, 2, 9, 2])),
        dims=kwargs.pop("dims", [96, 192, 384, 768]),
        patch_size=int(kwargs.pop("patch_size", 4)),
        in_chans=int(kwargs.pop("in_chans", 3)),
        num_classes=int(kwargs.pop("num_classes", 1000)),
        d_state=int(kwargs.pop("ssm_d_state", 16)),
        ssm_ratio=float(kwargs.pop("ssm_ratio", 2.0)),
        dt_rank=kwargs.pop("ssm_dt_rank", "auto"),
        ssm_act=str(ssm_act).lower(),
        conv_kernel=conv_kernel,
        conv_bias=conv_bias,
        ssm_init=ssm_init,
        proj_drop_rate=float(kwargs.pop("ssm_drop_rate", 0.0)),
        mlp_ratio=float(kwargs.pop("mlp_ratio", 4.0)),
        mlp_act=str(kwargs.pop("mlp_act_layer", "gelu")).lower(),
        mlp_drop_rate=float(kwargs.pop("mlp_drop_rate", 0.0)),
        gated_mlp=bool(kwargs.pop("gmlp", False)),
        drop_path_rate=float(kwargs.pop("drop_path_rate", 0.1)),
        patch_norm=bool(kwargs.pop("patch_norm", True)),
        pos_embed=bool(kwargs.pop("posembed", False)),
        img_size=kwargs.pop("imgsize", 224),
    )
    raise_official_problems("VMamba", kwargs, problems)
    return args


def from_official_kwargs(**kwargs: Any) -> VMamba:
    """Builds :class:`VMamba` from the official ``VSSM`` constructor kwargs (as recorded in fixtures).

    Load official weights with ``model.load_state_dict(checkpoint_filter_fn(sd, model))``.
    """
    return VMamba(**official_kwargs_to_model_args(**kwargs))


# --- registration ---------------------------------------------------------------------------------


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> VMamba:
    return create_hierarchical(VMamba, variant, pretrained, checkpoint_filter_fn, **kwargs)


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return hierarchical_cfg(url, **{
        "first_conv": "patch_embed.conv1",
        "license": "mit",
        "paper_ids": "arXiv:2401.10166",
        "paper_name": "VMamba: Visual State Space Model",
        "origin_url": "https://github.com/MzeroMiko/VMamba",
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vmamba_tiny.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"),
    "vmamba_small.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_small_0229s_ckpt_epoch_240.pth"),
    "vmamba_base.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_base_0229s_ckpt_epoch_225.pth"),
    "vmamba_v2_tiny.in1k": _cfg(_RELEASES + "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth"),
    "vmamba_v2_small.in1k": _cfg(_RELEASES + "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth"),
    "vmamba_v2_base.in1k": _cfg(_RELEASES + "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth"),
    "vmamba_v0_tiny.in1k": _cfg(_RELEASES + "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth", first_conv="patch_embed.proj"),
    "vmamba_v0_small.in1k": _cfg(_RELEASES + "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth", first_conv="patch_embed.proj"),
    "vmamba_v0_base.in1k": _cfg(_RELEASES + "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth", first_conv="patch_embed.proj"),
    "test_vmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), custom_load=False),
})

# the current release ("v2v", official vssm1_*_s1l*): no gate, d_state 1, ssm_ratio 1, MLP, conv stem
_CURRENT = dict(d_state=1, ssm_ratio=1.0, stem="conv2", downsample="conv3", conv_bias=False, gate=False, mlp_ratio=4.0)
# v2 (official vssm1_*_s2l*): as the current release with ssm_ratio 2
_V2 = dict(_CURRENT, ssm_ratio=2.0)
# v0 ("vanilla" VMamba): gated SS2D, d_state 16, no MLP, 4x4 patch stem, PatchMerging, fp32 scan
_V0 = dict(d_state=16, ssm_ratio=2.0, stem="patch", downsample="merge", conv_bias=True, gate=True, mlp_ratio=0.0,
           force_fp32=True)


def _vmamba(variant: str, config: Dict[str, Any], pretrained: bool, **kwargs: Any) -> VMamba:
    return _create_vmamba(variant, pretrained, **dict(config, **kwargs))


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T[s1l8] (current release): 30.2M params, 4.9 GFLOPs, 82.6% ImageNet-1k top-1."""
    return _vmamba("vmamba_tiny", dict(_CURRENT, depths=(2, 2, 8, 2), dims=96), pretrained, **kwargs)


@register_model
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-S[s1l20] (current release): 49.0M params, 8.6 GFLOPs, 83.3% ImageNet-1k top-1."""
    return _vmamba("vmamba_small", dict(_CURRENT, depths=(2, 2, 20, 2), dims=96), pretrained, **kwargs)


@register_model
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-B[s1l20] (current release): 86.6M params, 15.2 GFLOPs, 83.8% ImageNet-1k top-1."""
    return _vmamba("vmamba_base", dict(_CURRENT, depths=(2, 2, 20, 2), dims=128), pretrained, **kwargs)


@register_model
def vmamba_v2_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T[s2l5] (v2): 30.7M params, 4.9 GFLOPs, 82.5% ImageNet-1k top-1."""
    return _vmamba("vmamba_v2_tiny", dict(_V2, depths=(2, 2, 5, 2), dims=96), pretrained, **kwargs)


@register_model
def vmamba_v2_small(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-S[s2l15] (v2): 50.1M params, 8.7 GFLOPs, 83.6% ImageNet-1k top-1."""
    return _vmamba("vmamba_v2_small", dict(_V2, depths=(2, 2, 15, 2), dims=96), pretrained, **kwargs)


@register_model
def vmamba_v2_base(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-B[s2l15] (v2): 88.6M params, 15.4 GFLOPs, 83.9% ImageNet-1k top-1."""
    return _vmamba("vmamba_v2_base", dict(_V2, depths=(2, 2, 15, 2), dims=128), pretrained, **kwargs)


@register_model
def vmamba_v0_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Vanilla-VMamba-T (v0): 22.9M params, 5.6 GFLOPs, 82.2% ImageNet-1k top-1."""
    return _vmamba("vmamba_v0_tiny", dict(_V0, depths=(2, 2, 9, 2), dims=96), pretrained, **kwargs)


@register_model
def vmamba_v0_small(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Vanilla-VMamba-S (v0): 44.4M params, 11.2 GFLOPs, 83.5% ImageNet-1k top-1."""
    return _vmamba("vmamba_v0_small", dict(_V0, depths=(2, 2, 27, 2), dims=96), pretrained, **kwargs)


@register_model
def vmamba_v0_base(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Vanilla-VMamba-B (v0): 76.3M params, 18.0 GFLOPs, 83.7% ImageNet-1k top-1."""
    return _vmamba("vmamba_v0_base", dict(_V0, depths=(2, 2, 27, 2), dims=128), pretrained, **kwargs)


@register_model
def test_vmamba(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Test-sized VMamba (current-release layout): 4 stages of 1 block, widths 8..64, d_state 2, 32 px input."""
    return _vmamba("test_vmamba", dict(_CURRENT, depths=(1, 1, 1, 1), dims=8, d_state=2), pretrained, **kwargs)
