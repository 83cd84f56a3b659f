"""Training-free visual token reduction.

Rules (``reduction=``), picked per family by ``'auto'``:

* ``'cls_attention'`` (FasterVLM): models with a class token and softmax attention (ViT, CLIP ViTs). Score of
  a patch token = the [CLS] query's attention to it in the last attention layer the selected features pass
  through (the selected block's attention: with LLaVA's select_layer=-2 the penultimate block, as FasterVLM's
  ``attentions[select_layer]``; with -1 the encoder's final attention layer), averaged over heads. Keep the
  top-k patches, in their original raster order.
* ``'cls_similarity'``: models with a class token but no attention (Vim). Score = cosine similarity between
  the class token and the patch token at the selected layer: the class token is what the model trained to
  summarise the image, so patches it resembles are the ones it relies on.
* ``'deviation'``: models with neither (ConvNeXt, ConvLLaVA, MSVMamba, EfficientViM, SHViT, ViTamin).
  Score = L2 distance of a token from the mean token of its image at the selected layer: flat background
  regions sit near the mean, distinctive content does not. Top-k, original order.
* ``'pool'``: average-pool the patch grid to a target grid (keep_tokens must be h*w of that grid). Output is
  the pooled grid in raster order; every image region keeps a token.

All rules return exactly ``keep`` patch tokens per image.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "REDUCTIONS",
    "resolve_keep",
    "default_reduction",
    "find_last_attention",
    "CLSAttentionProbe",
    "keep_top_tokens",
    "cls_similarity_scores",
    "deviation_scores",
    "pool_to_grid",
    "grid_for",
]

REDUCTIONS = ("auto", "cls_attention", "cls_similarity", "deviation", "pool")


def resolve_keep(num_patches: int, keep_tokens: Optional[int], keep_ratio: Optional[float]) -> Optional[int]:
    """Number of patch tokens to keep, or None for no reduction."""
    if keep_tokens is not None and keep_ratio is not None:
        raise ValueError("give either keep_tokens or keep_ratio, not both")
    if keep_ratio is not None:
        if not 0.0 < float(keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        return max(1, int(round(float(keep_ratio) * num_patches)))
    if keep_tokens is None:
        return None
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or keep_tokens < 1:
        raise ValueError(f"keep_tokens must be a positive int, got {keep_tokens!r}")
    if keep_tokens > num_patches:
        raise ValueError(f"keep_tokens={keep_tokens} exceeds the {num_patches} patch tokens at this resolution")
    return keep_tokens


def find_last_attention(model: nn.Module) -> Optional[nn.Module]:
    """The last self-attention module with a fused qkv projection (timm's Attention and relatives) in ``model``."""
    last = None
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(module, "num_heads", None), int):
            last = module
    return last


def default_reduction(has_class_token: bool, has_attention: bool) -> str:
    if has_class_token and has_attention:
        return "cls_attention"
    if has_class_token:
        return "cls_similarity"
    return "deviation"


class CLSAttentionProbe:
    """Recomputes the [CLS] row of an attention layer's softmax from the layer's input (via a pre-hook).

    timm attention runs fused SDPA, which never materialises the weights; only the class query's row is needed,
    so it is recomputed from the layer's own qkv projection (class query and keys only) and q/k norms: one
    extra key projection and an N-long softmax per head, no N x N matrix.
    """

    def __init__(self, attn: nn.Module, cls_index: int = 0):
        self.attn = attn
        self.cls_index = cls_index
        self.scores: Optional[torch.Tensor] = None
        self._handle = None

    def __enter__(self) -> "CLSAttentionProbe":
        self.scores = None
        self._handle = self.attn.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args) -> None:
        x = args[0]
        b, n, c = x.shape
        heads = module.num_heads
        dim = module.qkv.out_features // 3
        weight, bias = module.qkv.weight, module.qkv.bias
        q_bias = bias[:dim] if bias is not None else None
        k_bias = bias[dim:2 * dim] if bias is not None else None
        # only the class query and the keys: a third of the qkv projection, no N x N matrix
        q = F.linear(x[:, self.cls_index : self.cls_index + 1], weight[:dim], q_bias)
        k = F.linear(x, weight[dim:2 * dim], k_bias)
        q = q.reshape(b, 1, heads, -1).transpose(1, 2)
        k = k.reshape(b, n, heads, -1).transpose(1, 2)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        scale = getattr(module, "scale", q.shape[-1] ** -0.5)
        logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, N)
        self.scores = logits.softmax(dim=-1).mean(dim=1).squeeze(1)  # (B, N), heads averaged


def keep_top_tokens(tokens: torch.Tensor, scores: torch.Tensor, keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``keep`` tokens by score per image, in their original order. Returns (tokens, sorted indices)."""
    if scores.shape != tokens.shape[:2]:
        raise ValueError(f"scores {tuple(scores.shape)} do not match tokens {tuple(tokens.shape[:2])}")
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values
    kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return kept, idx


def cls_similarity_scores(patches: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(patches.float(), cls_token.float().reshape(cls_token.shape[0], 1, -1), dim=-1)


def deviation_scores(patches: torch.Tensor) -> torch.Tensor:
    x = patches.float()
    return (x - x.mean(dim=1, keepdim=True)).norm(dim=-1)


def grid_for(keep: int, grid: Tuple[int, int]) -> Tuple[int, int]:
    """Target grid with ``keep`` cells and the aspect of ``grid`` (exact factorisation required)."""
    h, w = grid
    best = None
    for gh in range(1, keep + 1):
        if keep % gh:
            continue
        gw = keep // gh
        if gh > h or gw > w:
            continue
        err = abs(math.log(gh / gw) - math.log(h / w))
        if best is None or err < best[0]:
            best = (err, (gh, gw))
    if best is None:
        raise ValueError(f"keep_tokens={keep} cannot be laid out as a grid within the {h}x{w} patch grid")
    return best[1]


def pool_to_grid(patches: torch.Tensor, grid: Tuple[int, int], target: Tuple[int, int]) -> torch.Tensor:
    b, _, c = patches.shape
    x = patches.transpose(1, 2).reshape(b, c, grid[0], grid[1])
    return F.adaptive_avg_pool2d(x, target).flatten(2).transpose(1, 2)
