"""MSVMamba (Multi-Scale VMamba, Shi et al. 2024, arXiv:2405.14174) as timm models.

Numerically equivalent to the official ``VSSM`` with the released ``multiscale_4scan_12`` flag set
(YuHengsss/MSVMamba), checked against fixtures produced by the official code. What a block computes:

* ``x + SS2D(LN(x))`` then ``x + ConvFFN(LN(x))``, channels-last (B, H, W, C), LayerNorm eps 1e-5.
* SS2D: ``in_proj`` splits into ``x`` and the gate ``z`` (SiLU). Both branches start from ``x``:
  full resolution: 3x3 depthwise conv, SiLU, one row-major scan (parameter slot 1);
  low resolution: 7x7 stride-2 depthwise conv, SiLU, then the three directions reversed row-major,
  column-major, reversed column-major scanned as ONE concatenated sequence, the state carried across
  the direction boundaries (parameter slot 0). Every output token goes through the shared LayerNorm;
  the three low-res maps are put back on their pixels and summed, bilinearly upsampled
  (align_corners=False) and added to the full-res map; then squeeze-excitation (reduction 8), times
  the gate, ``out_proj``.
* ConvFFN: 1x1 conv (2x), plus a 3x3 depthwise residual, exact GELU, 1x1 conv.
* Stem: 4x4 stride-4 conv + LN. Downsampling: Swin PatchMerging (pads odd maps). Head: LN per token,
  average pool, Linear. ``dt_rank = ceil(C / 16)`` of the stage width C.

The scans go through :func:`zoo.ops.selective_scan` and :func:`zoo.ops.multi_direction.
selective_scan_multi_direction`, so compiled kernels speed the model up without changes here.
"""
import math
import os
import re
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import PatchMerging

from ..checkpoint import extract_state_dict, load_pretrained_file
from ..layers.conv import StridedConv2d
from ..layers.helpers import channels_last, leaf_function
from ..layers.linear import Linear
from ._hierarchical import (HierarchicalMixin, create_hierarchical, hierarchical_cfg, init_weights_trunc_normal,
                           raise_official_problems, rename_vmamba_legacy, stage_widths)
from ..layers.ssm import (ScanInputs, init_stacked_ssm_, scan, scan_multi_direction, ssm_parameters,
                          stacked_ssm_inputs)
from ..ops.mixer import batched_linear, fused_mixer_enabled, in_image_chunks, linear, rows_projection
from ..ops.multi_direction import MSVMAMBA_LOW_RES_ORDERS, ROW_MAJOR, SCAN_ORDERS, scan_order_indices

__all__ = [
    "MSVMamba",
    "MSVMambaBlock",
    "MultiScaleSS2D",
    "checkpoint_filter_fn",
    "from_official_kwargs",
    "official_kwargs_to_model_args",
]

# the stacked SSM parameters hold one slot per branch, in the official order
LOW_RES_SLOT = 0
FULL_RES_SLOT = 1


class SqueezeExcite(nn.Module):
    """Channel gate on a channels-last map: mean over pixels -> Linear -> ReLU -> Linear -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"SqueezeExcite: channels={channels} // reduction={reduction} leaves no hidden units")
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def gate(self, mean: torch.Tensor) -> torch.Tensor:
        """The per-channel gate in (0, 1) from the pixels' channel means."""
        return torch.sigmoid(self.fc2(self.act(self.fc1(mean))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean(dim=(1, 2), keepdim=True))


class MultiScaleSS2D(nn.Module):
    """The multi-scale 2-D selective-scan mixer (official ``SS2D`` with ``multiscale_4scan_12``)."""

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: Union[int, str] = "auto",
        conv_kernel: int = 3,
        conv_bias: bool = True,
        low_res_kernel: int = 7,
        low_res_orders: Sequence[str] = MSVMAMBA_LOW_RES_ORDERS,
        se_reduction: int = 8,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        if conv_kernel < 2 or conv_kernel % 2 == 0:
            raise ValueError(f"MultiScaleSS2D: conv_kernel must be odd and >= 3, got {conv_kernel}")
        bad = [o for o in low_res_orders if o not in SCAN_ORDERS]
        if not low_res_orders or bad:
            raise ValueError(f"MultiScaleSS2D: low_res_orders {tuple(low_res_orders)} must be names from {SCAN_ORDERS}")
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.low_res_orders: List[str] = list(low_res_orders)
        num_slots = 2
        # as attributes: TorchScript reads no int globals
        self.low_res_slot, self.full_res_slot = LOW_RES_SLOT, FULL_RES_SLOT

        self.in_proj = Linear(dim, 2 * d_inner, bias=False)
        self.act = nn.SiLU()
        self.conv_full = nn.Conv2d(
            d_inner, d_inner, conv_kernel, padding=(conv_kernel - 1) // 2, groups=d_inner, bias=conv_bias
        )
        self.conv_low = StridedConv2d(
            d_inner, d_inner, low_res_kernel, stride=2, padding=(low_res_kernel - 1) // 2, groups=d_inner,
            bias=conv_bias,
        )
        # per slot: token -> (dt_rank + 2 * d_state) projection, dt_rank -> d_inner, and A, D, dt bias
        self.x_proj_weight = nn.Parameter(torch.empty(num_slots, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(num_slots, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(num_slots, d_inner))
        self.A_logs = nn.Parameter(torch.empty(num_slots * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(num_slots * d_inner))
        self.out_norm = nn.LayerNorm(d_inner, eps=norm_eps)
        self.se = SqueezeExcite(d_inner, se_reduction) if se_reduction else nn.Identity()
        self.out_proj = Linear(d_inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, dt bias = softplus^-1(LogUniform[dt_min, dt_max])."""
        dt_min, dt_max, floor = self._dt_init
        init_stacked_ssm_(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                          dt_min=dt_min, dt_max=dt_max, dt_init_floor=floor)

    def _scan_inputs(self, x: torch.Tensor, slot: int) -> ScanInputs:
        """The scan inputs of one parameter slot for tokens x (B, d_inner, L)."""
        return stacked_ssm_inputs(x, slot, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                  self.A_logs, self.Ds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if not torch.jit.is_scripting():  # TorchScript and FX tracing keep the reference layout
            if fused_mixer_enabled(x, "scan_orders"):  # CPU inference: channels-last kernels, same result
                per_image = x.shape[1] * x.shape[2] * self.d_inner
                return self.proj_drop(in_image_chunks(self._forward_rows, x, per_image))
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = self.act(z)
        x = x.permute(0, 3, 1, 2)  # both branches start from x, before any conv

        x_full = self.act(self.conv_full(x)).flatten(2)  # (B, D, H * W), row-major
        y_full = scan(self._scan_inputs(x_full, self.full_res_slot))

        x_low = self.act(self.conv_low(x))
        low_h, low_w = x_low.shape[-2], x_low.shape[-1]
        y_low = scan_multi_direction(self._scan_inputs(x_low.flatten(2), self.low_res_slot), low_h, low_w,
                                     self.low_res_orders)
        # (B, n_orders, D, h * w), every direction already back in row-major pixel order

        # shared per-token LayerNorm, then merge
        y_full = self.out_norm(y_full.transpose(1, 2)).view(batch, height, width, self.d_inner)
        y_low = self.out_norm(y_low.transpose(-1, -2)).sum(dim=1)  # (B, h * w, D)
        y_low = y_low.transpose(1, 2).reshape(batch, self.d_inner, low_h, low_w)
        y_low = F.interpolate(y_low, size=(height, width), mode="bilinear", align_corners=False)
        y = y_full + y_low.permute(0, 2, 3, 1)
        y = self.se(y) * z
        return self.proj_drop(self.out_proj(y))


    @torch.jit.unused
    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer from in_proj through out_proj on channels-last maps and (B, L, C) rows
        (``zoo_scan::depthwise_conv2d_silu``, ``scan_orders`` and ``norm_merge_gate``, see zoo/ops/mixer.py):
        no transposes, no gathered copies per traversal order, one pass from the scans to out_proj."""
        batch, height, width, _ = x.shape
        d = self.d_inner
        xz = self.in_proj(x)
        x_in = xz[..., :d]
        conv = torch.ops.zoo_scan.depthwise_conv2d_silu
        u_full = conv(x_in, self.conv_full.weight, self.conv_full.bias, 1)
        u_low = conv(x_in, self.conv_low.weight, self.conv_low.bias, 2)
        low_h, low_w = u_low.shape[1], u_low.shape[2]
        y_full = self._scan_rows(u_full, self.full_res_slot, [ROW_MAJOR])[:, 0]
        y_low = self._scan_rows(u_low, self.low_res_slot, self.low_res_orders)  # (B, K, h * w, D)
        # out_norm, the upsampled order sum, silu(z) in one pass; SE's gate then scales out_proj's columns
        y, sums = torch.ops.zoo_scan.norm_merge_gate(
            y_full, y_low, height, width, low_h, low_w, self.out_norm.weight, self.out_norm.bias, self.out_norm.eps,
            xz[..., d:].flatten(1, 2))
        if isinstance(self.se, SqueezeExcite):
            gate = self.se.gate(sums / (height * width))  # (B, D): se(v) * silu(z) = v * silu(z) * gate
            if height * width > self.out_proj.out_features:  # more pixels than outputs: scale the weight's columns
                weight = self.out_proj.weight * gate[:, None, :]
                return batched_linear(y, weight).view(batch, height, width, -1)
            y = y.mul_(gate[:, None, :])
        return self.out_proj(y).view(batch, height, width, -1)

    @torch.jit.unused
    def _scan_rows(self, u: torch.Tensor, slot: int, orders: List[str]) -> torch.Tensor:
        """Channels-last u (B, h, w, D) scanned along ``orders`` as one sequence -> (B, K, h * w, D)."""
        batch, height, width, d = u.shape
        rows = u.view(batch, height * width, d)
        rank, n = self.dt_rank, self.d_state
        # (B, L, R + 2N): delta's rank-R input, B and C
        x_dbl = rows_projection(rows.view(1, batch * height * width, d), self.x_proj_weight[slot][None])
        x_dbl = x_dbl.view(batch, height * width, -1)
        A, D, delta_bias = ssm_parameters(self.A_logs[slot * d:(slot + 1) * d], self.Ds[slot * d:(slot + 1) * d],
                                          self.dt_projs_bias[slot])
        index = scan_order_indices(orders, height, width)
        # dt_proj runs inside the scan (dt_weight): the full-width delta is never materialised
        return torch.ops.zoo_scan.scan_orders(rows, x_dbl[..., :rank], A, x_dbl[..., rank:rank + n],
                                              x_dbl[..., rank + n:], D, delta_bias, index, True,
                                              self.dt_projs_weight[slot])


class ConvFFN(nn.Module):
    """1x1 conv -> (+ 3x3 depthwise residual) -> GELU -> 1x1 conv, on channels-last (B, H, W, C).

    The 1x1 convs keep the official Conv2d parameters but run as matmuls over the channels-last pixels
    (the same maths; on CPU a 1x1 conv on a channels-last map takes ATen's slow im2col path)."""

    def __init__(self, dim: int, expansion: int = 2, drop: float = 0.0):
        super().__init__()
        hidden = dim * expansion
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.drop1 = nn.Dropout(drop)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript and FX tracing keep the reference layout
            if not self.training and fused_mixer_enabled(x, "depthwise_conv2d_residual_gelu"):
                return self._forward_fused(x)
        x = self.drop1(F.linear(x, self.fc1.weight.flatten(1), self.fc1.bias))
        x = self.act(x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return self.drop2(F.linear(x, self.fc2.weight.flatten(1), self.fc2.bias))

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """CPU inference (no dropout): fc1's bias, the depthwise conv, the residual and GELU in one pass."""
        x = linear(x, self.fc1.weight.flatten(1))
        x = torch.ops.zoo_scan.depthwise_conv2d_residual_gelu(x, self.fc1.bias, self.dwconv.weight, self.dwconv.bias)
        return linear(x, self.fc2.weight.flatten(1), self.fc2.bias)


class MSVMambaBlock(nn.Module):
    """``x + SS2D(LN(x))`` then ``x + ConvFFN(LN(x))`` on (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        ffn_expansion: int = 2,
        ffn_drop: float = 0.0,
        norm_eps: float = 1e-5,
        **ssm_kwargs: Any,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = MultiScaleSS2D(dim, norm_eps=norm_eps, **ssm_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ConvFFN(dim, ffn_expansion, ffn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class MSVMambaStage(nn.Module):
    """Optional PatchMerging (stride 2) followed by blocks; channels-last in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 norm_eps: float = 1e-5, **block_kwargs: Any):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            MSVMambaBlock(dim, drop_path=drop_path[i], norm_eps=norm_eps, **block_kwargs) for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():  # inline: TorchScript cannot pass modules
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv, then LayerNorm; returns channels-last (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, norm_eps: float = 1e-5, patch_norm: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_image_batch(x, self.proj.in_channels, self.proj.stride[0])
        return self.norm(self.proj(channels_last(x)).permute(0, 2, 3, 1))


@torch.fx.wrap
@leaf_function
def check_image_batch(x: torch.Tensor, in_chans: int, patch: int) -> torch.Tensor:
    """``x`` unchanged, or a clear error (runs on real shapes under FX / TorchScript)."""
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[-2] < patch or x.shape[-1] < patch:
        raise ValueError(
            f"MSVMamba: expected an image batch of shape (B, {in_chans}, H, W) with H and W "
            f">= {patch} (the stem patch size), got {tuple(x.shape)}")
    return x


class MSVMamba(HierarchicalMixin, nn.Module):
    """Multi-Scale VMamba classifier / backbone (4 stages at strides 4, 8, 16, 32).

    Args:
        depths: blocks per stage. dims: width of stage 0 (doubled per stage) or one width per stage.
        d_state, ssm_ratio, dt_rank: SSM state size ('auto' = ceil(C/6) per stage, as the official
            code), inner expansion, delta rank ('auto' = ceil(C/16)).
        conv_kernel: full-resolution depthwise kernel. se_reduction: 0 disables the SE gate.
        low_res_orders: traversal orders of the low-resolution branch (default: the official three).
        ffn_expansion, ffn_drop_rate: ConvFFN width ratio and dropout.
        proj_drop_rate: dropout after the mixer's out_proj. drop_rate: before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        device, dtype: where / in what dtype the parameters live (timm's factory keywords).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (1, 2, 9, 2),
        dims: Union[int, Sequence[int]] = 96,
        patch_size: int = 4,
        patch_norm: bool = True,
        d_state: Union[int, str] = 1,
        ssm_ratio: float = 2.0,
        dt_rank: Union[int, str] = "auto",
        conv_kernel: int = 3,
        conv_bias: bool = True,
        se_reduction: int = 8,
        low_res_orders: Sequence[str] = MSVMAMBA_LOW_RES_ORDERS,
        ffn_expansion: int = 2,
        ffn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dims = stage_widths(dims, depths, "MSVMamba")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size, norm_eps, patch_norm)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, 0 -> rate
        stages, self.feature_info = [], []
        stride = patch_size
        for i, depth in enumerate(depths):
            if i > 0:
                stride *= 2
            stages.append(MSVMambaStage(
                in_dim=dims[max(i - 1, 0)], dim=dims[i], depth=depth, downsample=i > 0,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_eps=norm_eps,
                ffn_expansion=ffn_expansion, ffn_drop=ffn_drop_rate, ssm_ratio=ssm_ratio,
                d_state=math.ceil(dims[i] / 6) if d_state == "auto" else int(d_state),
                dt_rank=dt_rank, conv_kernel=conv_kernel, conv_bias=conv_bias, low_res_orders=low_res_orders,
                se_reduction=se_reduction, proj_drop=proj_drop_rate,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC")
        self.apply(init_weights_trunc_normal)
        if device is not None or dtype is not None:  # timm's factory kwargs
            self.to(device=device, dtype=dtype)

    # --- timm model API (the rest comes from HierarchicalMixin) ----------------------------------------

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the channels-last stage-0 input (B, H/4, W/4, dims[0])."""
        return self.patch_embed(x)

    # --- checkpoints ----------------------------------------------------------------------------

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Loads an official or zoo checkpoint file safely (see :mod:`zoo.checkpoint`).

        Classifier weights are skipped when their shape does not fit this model's head (other
        ``num_classes``, or no head), as timm does for pretrained weights.
        """
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn, classifier="head.fc", strict=strict)


# --- official checkpoints and constructor kwargs ---------------------------------------------------

_BLOCK_RENAMES = (
    ("norm.", "norm1."),
    ("op.conv2d_b1.", "mixer.conv_low."),
    ("op.conv2d.", "mixer.conv_full."),
    ("op.se.fc.0.", "mixer.se.fc1."),
    ("op.se.fc.2.", "mixer.se.fc2."),
    ("op.", "mixer."),
    ("convFFN.linear1.", "ffn.fc1."),
    ("convFFN.linear2.", "ffn.fc2."),
    ("convFFN.dwc.", "ffn.dwconv."),
    ("norm2.", "norm2."),
)
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$")
_DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.(.*)$")


def _map_official_key(key: str) -> str:
    """One official ``VSSM`` state-dict key -> this module's name (unknown keys are returned unchanged)."""
    key = rename_vmamba_legacy(key)
    if key.startswith("patch_embed.0."):
        return "patch_embed.proj." + key[len("patch_embed.0."):]
    if key.startswith("patch_embed.2."):
        return "patch_embed.norm." + key[len("patch_embed.2."):]
    if key.startswith("classifier.norm."):
        return "norm." + key[len("classifier.norm."):]
    if key.startswith("classifier.head."):
        return "head.fc." + key[len("classifier.head."):]
    m = _DOWNSAMPLE_KEY.match(key)
    if m:  # the official stage i ends with the merge that our stage i + 1 starts with
        return f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    m = _BLOCK_KEY.match(key)
    if m:
        rest = m.group(3)
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Converts an official MSVMamba checkpoint (or its ``model`` entry) to this module's names.

    Accepts the whole official checkpoint dict (weights under ``model``), a bare official state dict,
    or a zoo state dict (returned as is). Non-tensor entries are dropped.
    """
    state_dict = extract_state_dict(state_dict)
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    return {_map_official_key(k): v for k, v in state_dict.items()}


# official VSSM kwargs whose values this implementation reproduces; anything else is refused
_OFFICIAL_FIXED = {
    "ssm_act_layer": ("silu",),
    "forward_type": ("v2", "v1"),
    "mlp_ratio": (0, 0.0),
    "norm_layer": ("ln", "LN"),
    "downsample_version": ("v1",),
    "patchembed_version": ("v1",),
    "sscore_type": ("multiscale_4scan_12",),
    "recurrent": (False,),
    "inter_block_ssm": (False,),
    "grid_size": (0,),
    "multiscale_ratio": ([],),
    "multiscale_ksize": ([],),
    "continous_patch": (False,),
    "adaptive_merge": (False,),
    "add_conv": (True,),
    "b1_seq": (False,),
    "ms_fusion": (None,),
    "up_sample": ("interpolate",),
    "convFFN": (True,),
    "lpu": (False,),
    "sep_norm": (False,),
    "ms_split": ([1, 3],),
}
# accepted and without effect on the forward pass (initialisation / training-only switches)
_OFFICIAL_IGNORED = ("ssm_simple_init", "mlp_act_layer", "mlp_drop_rate", "b1_ratio", "use_checkpoint")


def official_kwargs_to_model_args(**kwargs: Any) -> Dict[str, Any]:
    """Maps the official ``VSSM(**kwargs)`` arguments to :class:`MSVMamba` arguments.

    Raises a ValueError naming every flag whose value selects behaviour this implementation does not
    reproduce (other scan types, MLP instead of ConvFFN, separate norms, ...), and unknown kwargs.
    """
    kwargs = dict(kwargs)
    args: Dict[str, Any] = {}
    problems = []
    for name, accepted in _OFFICIAL_FIXED.items():
        if name in kwargs:
            value = kwargs.pop(name)
            value = list(value) if isinstance(value, tuple) else value
            if value not in accepted:
                problems.append(f"{name}={value!r} (accepted: {', '.join(repr(a) for a in accepted)})")
    for name in _OFFICIAL_IGNORED:
        kwargs.pop(name, None)

    depths = list(kwargs.pop("depths", [2, 2, 9, 2]))
    ms_stage = kwargs.pop("ms_stage", None)
    if ms_stage is None or sorted(ms_stage) != list(range(len(depths))):
        problems.append(f"ms_stage={ms_stage!r} (every stage must be multi-scale: {list(range(len(depths)))})")
    ssm_ratio = float(kwargs.pop("ssm_ratio", 2.0))
    rank_ratio = float(kwargs.pop("ssm_rank_ratio", 2.0))
    if 0 < rank_ratio < ssm_ratio:
        problems.append(f"ssm_rank_ratio={rank_ratio} < ssm_ratio={ssm_ratio} (low-rank SSM is not supported)")
    ssm_conv = int(kwargs.pop("ssm_conv", 3))
    if ssm_conv < 2:
        problems.append(f"ssm_conv={ssm_conv} (the conv-free variant is not supported; accepted: odd >= 3)")
    args["patch_norm"] = bool(kwargs.pop("patch_norm", True))
    args.update(
        depths=tuple(depths),
        dims=kwargs.pop("dims", [96, 192, 384, 768]),
        patch_size=int(kwargs.pop("patch_size", 4)),
        in_chans=int(kwargs.pop("in_chans", 3)),
        num_classes=int(kwargs.pop("num_classes", 1000)),
        d_state=kwargs.pop("ssm_d_state", 16),
        ssm_ratio=ssm_ratio,
        dt_rank=kwargs.pop("ssm_dt_rank", "auto"),
        conv_kernel=ssm_conv,
        conv_bias=bool(kwargs.pop("ssm_conv_bias", True)),
        proj_drop_rate=float(kwargs.pop("ssm_drop_rate", 0.0)),
        drop_path_rate=float(kwargs.pop("drop_path_rate", 0.1)),
        ffn_drop_rate=float(kwargs.pop("ffn_dropout", 0.2)),
        se_reduction=8 if kwargs.pop("add_se", False) else 0,
    )
    raise_official_problems("MSVMamba", kwargs, problems)
    return args


def from_official_kwargs(**kwargs: Any) -> MSVMamba:
    """Builds :class:`MSVMamba` from the official ``VSSM`` constructor kwargs (as recorded in fixtures).

    Load official weights with ``model.load_state_dict(checkpoint_filter_fn(sd, model))``.
    """
    return MSVMamba(**official_kwargs_to_model_args(**kwargs))


# --- registration ---------------------------------------------------------------------------------


def _create_msvmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    return create_hierarchical(MSVMamba, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # the official .pth files pickle a yacs config: hierarchical_cfg loads them through model.load_pretrained
    return hierarchical_cfg(
        first_conv="patch_embed.proj", license="mit", paper_ids="arXiv:2405.14174",
        paper_name="Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model",
        origin_url="https://github.com/YuHengsss/MSVMamba", **kwargs)


default_cfgs = generate_default_cfgs({
    # released on Google Drive only (no direct URL): pass the downloaded file with
    # pretrained_cfg_overlay=dict(file='vssm_nano_ms_e300.pth')
    "msvmamba_nano.in1k": _cfg(),
    "msvmamba_micro.in1k": _cfg(),
    "msvmamba_tiny.in1k": _cfg(),
    "test_msvmamba.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), custom_load=False),
})


@register_model
def msvmamba_nano(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    """MSVMamba-Nano: 6.9M params, 0.88 GFLOPs, 77.3% ImageNet-1k top-1."""
    args = dict(depths=(1, 2, 5, 2), dims=48, d_state=1, ssm_ratio=2.0)
    return _create_msvmamba("msvmamba_nano", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_micro(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    """MSVMamba-Micro: 11.9M params, 1.53 GFLOPs, 79.8% ImageNet-1k top-1."""
    args = dict(depths=(1, 2, 5, 2), dims=64, d_state=1, ssm_ratio=2.0)
    return _create_msvmamba("msvmamba_micro", pretrained, **dict(args, **kwargs))


@register_model
def msvmamba_tiny(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    """MSVMamba-Tiny: 33.0M params, 4.61 GFLOPs, 82.8% ImageNet-1k top-1."""
    args = dict(depths=(1, 2, 9, 2), dims=96, d_state=1, ssm_ratio=2.0)
    return _create_msvmamba("msvmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def test_msvmamba(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    """Test-sized MSVMamba: 4 stages of 1 block, widths 8..64, 32 px default input."""
    args = dict(depths=(1, 1, 1, 1), dims=8, d_state=2, ssm_ratio=2.0)
    return _create_msvmamba("test_msvmamba", pretrained, **dict(args, **kwargs))
