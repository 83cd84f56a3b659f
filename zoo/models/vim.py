"""Vision Mamba (Vim) as timm models.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
Zhu et al., ICML 2024 (https://arxiv.org/abs/2401.13586); official code: hustvl/Vim.

What the released checkpoints compute (and this module reproduces):

* patch embedding: a conv with kernel ``patch_size`` and stride ``stride`` (stride 8 overlaps);
* the class token is inserted at index ``M // 2`` of the ``M`` patch tokens *before* the absolute
  position embedding is added, so row ``M // 2`` of ``pos_embed`` belongs to the class token;
* pre-norm blocks ``x + DropPath(Mixer(RMSNorm(x)))`` with the residual stream kept in fp32;
* the "bimamba v2" mixer: a shared ``in_proj`` producing ``x`` and the gate ``z``, then two scan
  directions with their own depthwise conv, ``x_proj``, ``dt_proj``, ``A_log`` and ``D``; the reverse
  direction sees the sequence back to front. Their gated outputs are averaged, then ``out_proj``;
* the readout is the class token after the final RMSNorm.

The reverse direction is computed without flipping activations: its depthwise conv is applied
anti-causally and its scan runs from the last token to the first, so both directions hand their inputs
to :func:`zoo.ops.selective_scan_bidirectional` in the original token order (a fused kernel can then
replace the reference scan without any change here).

Checkpoint key names differ from the official ones (``layers.*`` -> ``blocks.*``, the per-direction
tensors live in ``mixer.fwd`` / ``mixer.bwd``, ``norm_f`` -> ``norm``); :func:`checkpoint_filter_fn`
maps them. :func:`from_official_kwargs` builds a model from the official ``VisionMamba`` kwargs.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, register_notrace_module, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.checkpoint import extract_state_dict
from zoo.layers.helpers import leaf_function
from zoo.layers.linear import Linear
from zoo.layers.ssm import ScanDirection1d, fp32_or_wider, init_dt_bias_, init_dt_proj_weight_, scan_bidirectional
from zoo.ops.mixer import bimamba_rows, fused_mixer_enabled

__all__ = [
    "Vim",
    "VimBlock",
    "BiMambaMixer",
    "checkpoint_filter_fn",
    "from_official_kwargs",
    "resample_vim_pos_embed",
]

_GLOBAL_POOLS = ("token", "avg", "last", "")
_CLS_POSITIONS = ("middle", "first")


def _class_token_index(num_patches: int, position: str) -> int:
    """Where the class token sits among ``num_patches + 1`` tokens."""
    return num_patches // 2 if position == "middle" else 0


@register_notrace_module  # steps out of autocast by device type: a leaf for FX
class FP32RMSNorm(nn.Module):
    """Weight-only RMSNorm computed in fp32 whatever the input dtype (or autocast) is.

    The output has the weight's dtype, so the following projection runs in the model's (or
    autocast's) precision while the statistics never lose range.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._norm(x)  # TorchScript has no autocast to step out of
        if self.weight.dtype == torch.float32 and fused_mixer_enabled(x, "rms_norm"):  # CPU inference, one pass
            return torch.ops.zoo_scan.rms_norm(x, self.weight, self.eps)
        # devices without autocast (meta, for shape inference) refuse torch.autocast(..., enabled=False)
        if not torch.amp.is_autocast_available(x.device.type):
            return self._norm(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = fp32_or_wider(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * fp32_or_wider(self.weight)).to(self.weight.dtype)


class OverlapPatchEmbed(nn.Module):
    """Conv patch embedding with a stride that may be smaller than the patch (no padding)."""

    def __init__(self, img_size: Union[int, Tuple[int, int]], patch_size: int, stride: int, in_chans: int,
                 embed_dim: int):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.in_chans = in_chans
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid for an input of ``img_size`` (H, W), or a ValueError if it does not tile."""
        return _patch_grid(img_size[0], img_size[1], self.patch_size, self.stride)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid = checked_patch_grid(x, self.in_chans, self.patch_size, self.stride)
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, M, C)
        return x, grid


def _patch_grid(h: int, w: int, patch: Tuple[int, int], stride: Tuple[int, int]) -> Tuple[int, int]:
    (ph, pw), (sh, sw) = patch, stride
    if h < ph or w < pw or (h - ph) % sh or (w - pw) % sw:
        nearest_h, nearest_w = (max(p, p + round((n - p) / s) * s) for n, p, s in ((h, ph, sh), (w, pw, sw)))
        raise ValueError(
            f"Vim: input size {h}x{w} does not fit the patch grid (patch {ph}x{pw}, stride {sh}x{sw}); "
            f"accepted: H >= {ph}, W >= {pw} with (H - {ph}) % {sh} == 0 and (W - {pw}) % {sw} == 0, "
            f"e.g. {nearest_h}x{nearest_w}"
        )
    return (h - ph) // sh + 1, (w - pw) // sw + 1


@torch.fx.wrap
@leaf_function
def checked_patch_grid(x: torch.Tensor, in_chans: int, patch: Tuple[int, int],
                        stride: Tuple[int, int]) -> Tuple[int, int]:
    """The token grid of an image batch, or a clear error (runs on real shapes under FX / TorchScript)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"Vim: expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    return _patch_grid(int(x.shape[-2]), int(x.shape[-1]), patch, stride)


class BiMambaMixer(nn.Module):
    """Vim's bidirectional ("bimamba v2") Mamba mixer: (B, L, dim) -> (B, L, dim).

    ``fwd`` reads the tokens first to last, ``bwd`` last to first (anti-causal conv, reverse scan);
    both hand their inputs to the scan in the original token order.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: Optional[int] = None, divide_out: bool = True):
        super().__init__()
        self.d_inner = int(expand * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else int(dt_rank)
        self.out_scale = 0.5 if divide_out else 1.0
        self.in_proj = Linear(dim, 2 * self.d_inner, bias=False)
        self.fwd = ScanDirection1d(self.d_inner, d_state, self.dt_rank, d_conv, reverse=False)
        self.bwd = ScanDirection1d(self.d_inner, d_state, self.dt_rank, d_conv, reverse=True)
        self.out_proj = Linear(self.d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x)
        if not torch.jit.is_scripting():  # TorchScript and FX tracing keep the reference layout
            if fused_mixer_enabled(xz):  # CPU inference: row-layout kernels, same result (zoo/ops/mixer.py)
                return self.out_proj(bimamba_rows(xz, self.fwd, self.bwd, self.out_scale))
        xz = xz.transpose(1, 2)  # (B, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = scan_bidirectional(self.fwd(x), self.bwd(x), z=z, scale=self.out_scale)
        return self.out_proj(y.transpose(1, 2))


class VimBlock(nn.Module):
    """Pre-norm residual block ``x + DropPath(Mixer(RMSNorm(x)))``; the residual stays fp32."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: Optional[int] = None, divide_out: bool = True, drop_path: float = 0.0,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm = FP32RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMambaMixer(dim, d_state, d_conv, expand, dt_rank, divide_out)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fp32_or_wider(x)
        return x + self.drop_path(self.mixer(self.norm(x))).to(x.dtype)


def resample_vim_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Optional[Sequence[int]] = None,
    cls_position: Optional[str] = "middle",
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resizes a Vim position embedding (1, [1 +] gh*gw, C) to another patch grid.

    The class-token row (at index ``M // 2`` for ``cls_position='middle'``, 0 for ``'first'``, none for
    ``None``) is taken out, the patch rows are resampled as a 2-D grid, and the class row is put back at
    its index for the new grid.
    """
    has_cls = cls_position is not None
    n_patch = pos_embed.shape[1] - int(has_cls)
    if old_grid is None:
        side = math.isqrt(n_patch)
        if side * side != n_patch:
            raise ValueError(
                f"Vim: cannot infer the grid of a pos_embed with {n_patch} patch rows (not a square); pass old_grid"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old_grid[0] * old_grid[1] != n_patch:
        raise ValueError(f"Vim: pos_embed has {n_patch} patch rows but old_grid {old_grid} needs {old_grid[0] * old_grid[1]}")
    if old_grid == new_grid:
        return pos_embed
    if has_cls:
        i_old = _class_token_index(n_patch, cls_position)
        cls_row = pos_embed[:, i_old:i_old + 1]
        patches = torch.cat([pos_embed[:, :i_old], pos_embed[:, i_old + 1:]], dim=1)
    else:
        patches = pos_embed
    patches = resample_abs_pos_embed(
        patches, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0,
        interpolation=interpolation, antialias=antialias,
    )
    if not has_cls:
        return patches
    i_new = _class_token_index(new_grid[0] * new_grid[1], cls_position)
    return torch.cat([patches[:, :i_new], cls_row.to(patches.dtype), patches[:, i_new:]], dim=1)


@torch.fx.wrap
@leaf_function
def pos_embed_for_grid(pos_embed: torch.Tensor, grid: Tuple[int, int], default_grid: Tuple[int, int],
                        cls_position: Optional[str]) -> torch.Tensor:
    """``pos_embed`` as is for the default grid, else resampled to ``grid`` (needs real sizes under FX)."""
    if tuple(grid) == tuple(default_grid):
        return pos_embed
    return resample_vim_pos_embed(pos_embed, grid, default_grid, cls_position)


class Vim(nn.Module):
    """Vision Mamba backbone with the timm model interface.

    Args:
        img_size: default input size (sets the ``pos_embed`` grid; other sizes are interpolated).
        patch_size, stride: patch conv kernel and stride (``stride=None`` -> ``patch_size``).
        in_chans, num_classes: input channels; classes of the head (0 -> no head).
        global_pool: ``'token'`` (class token), ``'avg'`` (mean of all tokens), ``'last'`` (last token)
            or ``''`` (no pooling).
        embed_dim, depth: width and number of blocks.
        d_state, d_conv, expand, dt_rank: Mamba mixer sizes (``dt_rank=None`` -> ceil(embed_dim / 16)).
        class_token: whether there is a class token; ``cls_position``: ``'middle'`` (Vim) or ``'first'``.
        divide_out: average the two directions (True, released models) instead of summing them.
        drop_rate: dropout before the head; pos_drop_rate: dropout after adding pos_embed (the official
            ``drop_rate``); drop_path_rate: stochastic depth, rising linearly over the blocks.
        layer_shuffle_prob: ShuffleMamba stochastic layer-wise shuffle, the probability at the last
            block (rising linearly from 0 at the first). Training only: a shuffled block sees its patch
            tokens in a random per-sample order (the class token stays at its index), and the order is
            restored after the block.
        norm_eps: RMSNorm epsilon.
        device, dtype: where / in what dtype the parameters live (timm's factory keywords).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        stride: Optional[int] = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: Optional[int] = None,
        class_token: bool = True,
        cls_position: str = "middle",
        divide_out: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_shuffle_prob: float = 0.0,
        norm_eps: float = 1e-5,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"Vim: global_pool={global_pool!r} is not supported; accepted: {_GLOBAL_POOLS}")
        if global_pool == "token" and not class_token:
            raise ValueError("Vim: global_pool='token' needs class_token=True; use 'avg' or 'last' without one")
        if cls_position not in _CLS_POSITIONS:
            raise ValueError(f"Vim: cls_position={cls_position!r} is not supported; accepted: {_CLS_POSITIONS}")
        if not 0.0 <= layer_shuffle_prob <= 1.0:
            raise ValueError(f"Vim: layer_shuffle_prob must be in [0, 1], got {layer_shuffle_prob}")
        if depth < 1:
            raise ValueError(f"Vim: depth must be >= 1, got {depth}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.cls_position = cls_position if class_token else None
        self.layer_shuffle_prob = float(layer_shuffle_prob)
        self.grad_checkpointing = False

        stride = patch_size if stride is None else stride
        self.patch_embed = OverlapPatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # python floats (not torch.linspace) so that building on the meta device works
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.Sequential(*[
            VimBlock(embed_dim, d_state, d_conv, expand, dt_rank, divide_out, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)
        ])
        red = self.patch_embed.stride[0]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=red) for i in range(depth)]
        self.norm = FP32RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if device is not None or dtype is not None:  # timm's factory kwargs
            self.to(device=device, dtype=dtype)

    # --- init -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self) -> None:
        """The official init: ViT-style stem/head, Mamba's dt/A/D init, GPT-2 style out_proj scaling."""
        depth = len(self.blocks)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for blk in self.blocks:
            mixer = blk.mixer
            # forward dt: softplus(bias) log-uniform in [1e-3, 0.1], weight U(+-dt_rank^-0.5)
            init_dt_proj_weight_(mixer.fwd.dt_proj.weight, mixer.dt_rank)
            init_dt_bias_(mixer.fwd.dt_proj.bias, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
            # the official code leaves the reverse dt_proj at the default Linear init and zeroes its bias
            nn.init.zeros_(mixer.bwd.dt_proj.bias)
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            mixer.out_proj.weight.div_(math.sqrt(depth))

    # --- timm interface ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """pos_embed, cls_token and every SSM A_log / D (the official repo decays A_log by mistake)."""
        # by name, not by the parameters' ``_no_weight_decay`` flag, which FSDP's re-created parameters lose
        names = {"pos_embed", "cls_token"}
        names.update(n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D")))
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in _GLOBAL_POOLS:
                raise ValueError(f"Vim: global_pool={global_pool!r} is not supported; accepted: {_GLOBAL_POOLS}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("Vim: global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.pos_embed  # the new head lives where the model does
        self.head = (nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    # --- forward ----------------------------------------------------------------------------------
    def cls_token_index(self, grid: Tuple[int, int]) -> Optional[int]:
        """Index of the class token in the sequence for a token grid, None without a class token."""
        position = self.cls_position
        if position is None:
            return None
        return _class_token_index(grid[0] * grid[1], position)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, grid = self.patch_embed(x)
        # the residual stream is fp32 (also under autocast / a half-precision model); widen before
        # inserting the class token so that autocast does not round it to the conv's half precision
        x = fp32_or_wider(x)
        i = self.cls_token_index(grid)
        if self.cls_token is not None and i is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :i], cls, x[:, i:]], dim=1)
        pos_embed = pos_embed_for_grid(self.pos_embed, grid, self.patch_embed.grid_size, self.cls_position)
        x = x + fp32_or_wider(pos_embed)
        return self.pos_drop(x), grid

    def _shuffle_probability(self, index: int) -> float:
        depth = len(self.blocks)
        return self.layer_shuffle_prob * (index / (depth - 1) if depth > 1 else 1.0)

    def _token_permutation(self, x: torch.Tensor, cls_index: Optional[int]) -> torch.Tensor:
        """(B, L) gather indices that shuffle the patch tokens per sample and keep the class token put."""
        batch, length = x.shape[:2]
        positions = torch.arange(length, device=x.device)
        if cls_index is not None:
            positions = torch.cat([positions[:cls_index], positions[cls_index + 1:]])
        order = torch.rand(batch, positions.numel(), device=x.device).argsort(dim=1)
        index = torch.arange(length, device=x.device).repeat(batch, 1)
        index[:, positions] = positions[order]
        return index

    def _run_block(self, i: int, block: nn.Module, x: torch.Tensor, cls_index: Optional[int]) -> torch.Tensor:
        perm = None
        if self.training and self.layer_shuffle_prob > 0:
            p = self._shuffle_probability(i)
            if p > 0 and torch.rand(()).item() < p:
                perm = self._token_permutation(x, cls_index)
                x = x.gather(1, perm.unsqueeze(-1).expand_as(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
        if perm is not None:
            x = x.gather(1, perm.argsort(dim=1).unsqueeze(-1).expand_as(x))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normed tokens (B, 1 + M, C) with the class token at its index."""
        x, grid = self._embed(x)
        if torch.jit.is_scripting():
            if self.training and self.layer_shuffle_prob > 0:
                raise RuntimeError("Vim: layer shuffle (layer_shuffle_prob > 0) does not run under TorchScript")
            x = self.blocks(x)  # (grad checkpointing is off under TorchScript, as in timm)
        else:
            cls_index = self.cls_token_index(grid)
            for i, block in enumerate(self.blocks):
                x = self._run_block(i, block, x, cls_index)
        return self.norm(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            position = self.cls_position
            assert position is not None  # checked in __init__ / reset_classifier
            return x[:, _class_token_index(x.shape[1] - 1, position)]
        if self.global_pool == "avg":
            return x.mean(dim=1)
        if self.global_pool == "last":
            return x[:, -1]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self._pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs as token maps (class token removed), and optionally the final features.

        Args:
            indices: last n blocks if int, all if None, else the listed block indices.
            return_prefix_tokens: pair every map with the class token (B, 1, C).
            norm: apply the final norm to the intermediates.
            stop_early: stop after the last requested block.
            output_fmt: 'NCHW' (B, C, gh, gw) or 'NLC' (B, gh*gw, C).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"Vim: output_fmt={output_fmt!r} is not supported; accepted: 'NCHW', 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        cls_index = self.cls_token_index(grid)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(i, block, x, cls_index)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix = None
        if cls_index is not None:
            prefix = [y[:, cls_index:cls_index + 1] for y in intermediates]
            intermediates = [torch.cat([y[:, :cls_index], y[:, cls_index + 1:]], dim=1) for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [
                y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drops the blocks after the last requested index (and the norm / head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# --- official checkpoints -------------------------------------------------------------------------
_MIXER_KEY_MAP = {
    "conv1d.": "fwd.conv1d.",
    "conv1d_b.": "bwd.conv1d.",
    "x_proj.": "fwd.x_proj.",
    "x_proj_b.": "bwd.x_proj.",
    "dt_proj.": "fwd.dt_proj.",
    "dt_proj_b.": "bwd.dt_proj.",
    "A_log": "fwd.A_log",
    "A_b_log": "bwd.A_log",
    "D": "fwd.D",
    "D_b": "bwd.D",
}


def _map_official_key(key: str) -> str:
    if key.startswith("norm_f."):
        return "norm." + key[len("norm_f."):]
    if not key.startswith("layers."):
        return key
    _, idx, rest = key.split(".", 2)
    if rest.startswith("mixer."):
        name = rest[len("mixer."):]
        for old, new in _MIXER_KEY_MAP.items():
            if name == old or (old.endswith(".") and name.startswith(old)):
                name = new + name[len(old):]
                break
        rest = "mixer." + name
    return f"blocks.{idx}.{rest}"


def checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor],
    model: Vim,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Dict[str, torch.Tensor]:
    """Converts an official Vim checkpoint (raw, or wrapped in ``{'model': ...}``) to this model's keys.

    Non-tensor entries (epoch, args, ...) are dropped and a DDP ``module.`` prefix is stripped (see
    :func:`zoo.checkpoint.extract_state_dict`); zoo-format state dicts pass through. ``pos_embed`` is resized to the model's patch grid with the
    class-token row handled at its (middle) index.
    """
    state_dict = extract_state_dict(state_dict, keys=("model", "model_ema", "state_dict", "module"))
    out = {}
    for key, value in state_dict.items():
        key = _map_official_key(key)
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resample_vim_pos_embed(
                value, model.patch_embed.grid_size, cls_position=model.cls_position,
                interpolation=interpolation, antialias=antialias,
            )
        out[key] = value
    return out


# official VisionMamba constructor kwargs -> what we do with them
_OFFICIAL_DEFAULTS: Dict[str, Any] = dict(
    img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192, d_state=16, channels=3, num_classes=1000,
    ssm_cfg=None, drop_rate=0.0, drop_path_rate=0.1, norm_epsilon=1e-5, rms_norm=True, initializer_cfg=None,
    fused_add_norm=True, residual_in_fp32=True, device=None, dtype=None, ft_seq_len=None, pt_hw_seq_len=14,
    if_bidirectional=False, final_pool_type="none", if_abs_pos_embed=True, if_rope=False, if_rope_residual=False,
    flip_img_sequences_ratio=-1.0, if_bimamba=False, bimamba_type="v2", if_cls_token=True, if_divide_out=True,
    init_layer_scale=None, use_double_cls_token=False, use_middle_cls_token=True,
)
# the official released `vim_base` constructor passes this misspelling; VisionMamba swallows it unused
_OFFICIAL_IGNORED = {"if_devide_out"}
_SSM_CFG_DEFAULTS: Dict[str, Any] = dict(
    dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
    use_fast_path=True,
)


def _require(flag: str, value: Any, accepted: Callable[[Any], bool], what: str) -> None:
    if not accepted(value):
        raise ValueError(f"from_official_kwargs: official flag {flag}={value!r} is not supported; accepted: {what}")


def from_official_kwargs(**kwargs: Any) -> Vim:
    """Builds a :class:`Vim` from the official ``VisionMamba(**kwargs)`` constructor arguments.

    Flags that change the computation in ways this port does not implement (rope, v1 / no bimamba,
    double class tokens, layer scale, LayerNorm, random sequence flips, ...) raise a ValueError naming the
    flag. Flags with no effect on the result (``fused_add_norm``, ``residual_in_fp32``: the residual is
    always fp32 here; rope sequence lengths without rope) are accepted.
    """
    unknown = sorted(set(kwargs) - set(_OFFICIAL_DEFAULTS) - _OFFICIAL_IGNORED)
    if unknown:
        raise ValueError(
            f"from_official_kwargs: unknown official VisionMamba flag(s) {unknown}; accepted: {sorted(_OFFICIAL_DEFAULTS)}"
        )
    kw = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in kwargs.items() if k not in _OFFICIAL_IGNORED}}

    _require("rms_norm", kw["rms_norm"], lambda v: v is True, "True (the LayerNorm variant is not ported)")
    _require("if_bidirectional", kw["if_bidirectional"], lambda v: not v, "False")
    _require("if_abs_pos_embed", kw["if_abs_pos_embed"], lambda v: v is True, "True")
    _require("if_rope", kw["if_rope"], lambda v: not v, "False")
    _require("flip_img_sequences_ratio", kw["flip_img_sequences_ratio"], lambda v: v <= 0, "<= 0 (no random flips)")
    _require("if_bimamba", kw["if_bimamba"], lambda v: not v, "False (bimamba v1 is not ported)")
    _require("bimamba_type", kw["bimamba_type"], lambda v: v == "v2", "'v2'")
    _require("init_layer_scale", kw["init_layer_scale"], lambda v: v is None, "None")
    _require("use_double_cls_token", kw["use_double_cls_token"], lambda v: not v, "False")
    _require("initializer_cfg", kw["initializer_cfg"], lambda v: not v, "None")
    _require("device", kw["device"], lambda v: v is None, "None (move the model afterwards)")
    _require("dtype", kw["dtype"], lambda v: v is None, "None (cast the model afterwards)")

    ssm = dict(kw["ssm_cfg"] or {})
    d_state = ssm.pop("d_state", kw["d_state"])
    d_conv = ssm.pop("d_conv", 4)
    expand = ssm.pop("expand", 2)
    dt_rank = ssm.pop("dt_rank", "auto")
    for name, value in ssm.items():
        if name not in _SSM_CFG_DEFAULTS or value != _SSM_CFG_DEFAULTS[name]:
            raise ValueError(
                f"from_official_kwargs: ssm_cfg[{name!r}]={value!r} is not supported; accepted keys: d_state, "
                f"d_conv, expand, dt_rank, and {sorted(_SSM_CFG_DEFAULTS)} at their defaults"
            )

    if kw["if_cls_token"]:
        global_pool = "token"  # final_pool_type is dead code when there is a class token
    else:
        pools = {"mean": "avg", "none": "last"}
        _require("final_pool_type", kw["final_pool_type"], lambda v: v in pools,
                 "'mean' or 'none' when if_cls_token=False")
        global_pool = pools[kw["final_pool_type"]]

    img_size = kw["img_size"]
    patch = kw["patch_size"]
    _require("patch_size", patch, lambda v: isinstance(v, int), "an int")
    return Vim(
        img_size=img_size,
        patch_size=patch,
        stride=kw["stride"],
        in_chans=kw["channels"],
        num_classes=kw["num_classes"],
        global_pool=global_pool,
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        d_state=d_state,
        d_conv=d_conv,
        expand=expand,
        dt_rank=None if dt_rank == "auto" else dt_rank,
        class_token=bool(kw["if_cls_token"]),
        cls_position="middle" if kw["use_middle_cls_token"] else "first",
        divide_out=bool(kw["if_divide_out"]),
        pos_drop_rate=kw["drop_rate"],
        drop_path_rate=kw["drop_path_rate"],
        norm_eps=kw["norm_epsilon"],
    )


# --- registration ---------------------------------------------------------------------------------
def _create_vim(variant: str, pretrained: bool = False, **kwargs: Any) -> Vim:
    # features_only default: the last 3 blocks (all of them for shallower models)
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 24)))
    return build_model_with_cfg(
        Vim,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2401.13586",
        "origin_url": "https://github.com/hustvl/Vim",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_patch16_stride8_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_80p5acc.pth"),
    "vim_small_patch16_stride8_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base_patch16_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-base-midclstok", hf_hub_filename="vim_b_midclstok_81p9acc.pth"),
    "test_vim.untrained": _cfg(input_size=(3, 32, 32), num_classes=1000),
})


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-Ti: 7M params, 24 blocks of width 192, patch 16."""
    args = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-Ti+ : Vim-Ti with overlapping patches (stride 8, 27x27 tokens at 224)."""
    args = dict(patch_size=16, stride=8, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S: 26M params, 24 blocks of width 384, patch 16."""
    args = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S+ : Vim-S with overlapping patches (stride 8)."""
    args = dict(patch_size=16, stride=8, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-B: 98M params, 24 blocks of width 768, patch 16."""
    args = dict(patch_size=16, embed_dim=768, depth=24)
    return _create_vim("vim_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def test_vim(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Tiny test-sized Vim: 32 px input, patch 8, 3 blocks of width 32 (3 feature levels, as timm's tests want)."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, d_state=8)
    return _create_vim("test_vim", pretrained, **dict(args, **kwargs))
