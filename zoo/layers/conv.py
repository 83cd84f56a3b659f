"""A strided ``nn.Conv2d`` that runs stride 1 along any dimension where its output is one position wide.

Why: on CPUs where PyTorch's oneDNN takes its bf16 path (AVX-512 BF16 / AMX Xeons, torch 2.14.1), the
weight gradient of a zero-padded (padding > 0) conv is wrong when, along a dimension with stride > 1,
the output is one position: it holds whatever its buffer held before (seen: 1e37, inf, NaN, changing
from run to run). fp32, stride 1, no padding, and longer outputs are right. Such outputs appear wherever
a strided conv meets a map of a few pixels: MSVMamba's low-resolution branch at its last stage, or the
downsampling of a small input. Along such a dimension the stride never acts, so a stride-1 conv over
the one window (cropped, zero-padded) is the same function of input and weights: results and gradients
are unchanged on every device and dtype, and the fix costs a pad of a few pixels where it applies.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import leaf_function

__all__ = ["StridedConv2d", "strided_conv2d"]


@torch.fx.wrap
@leaf_function
def strided_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                   padding: List[int], groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=groups)`` (zero padding, no dilation); a
    strided conv with one output along a dimension is computed with stride 1 along it, over the one
    window it reads there."""
    kernel = (weight.shape[-2], weight.shape[-1])
    size = (x.shape[-2], x.shape[-1])
    stride1, padding1, crop, pad = list(stride), list(padding), list(size), [0, 0, 0, 0]
    for d in range(2):
        k, n, s, p = kernel[d], size[d], stride[d], padding[d]
        if s > 1 and p < k and (n + 2 * p - k) // s == 0:  # one output along d: one window, any stride
            # it covers padded positions [0, k): input [0, k - p), then zeros past the input's end
            crop[d] = min(n, k - p)
            pad[2 - 2 * d], pad[3 - 2 * d] = p, k - p - crop[d]  # F.pad lists the last dim first
            stride1[d], padding1[d] = 1, 0
    if stride1 == list(stride):
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)
    window = F.pad(x[..., :crop[0], :crop[1]], pad)
    return F.conv2d(window, weight, bias, stride1, padding1, 1, groups)


class StridedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) for strided, zero-padded convs that may see maps
    small enough for a one-position output along a dimension: those run through :func:`strided_conv2d`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or tuple(self.dilation) != (1, 1):
            raise ValueError(
                f"zoo.layers.StridedConv2d: takes zero padding given as numbers and dilation 1, got padding_mode "
                f"{self.padding_mode!r}, padding {self.padding!r}, dilation {self.dilation!r}; use nn.Conv2d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return strided_conv2d(x, self.weight, self.bias, [self.stride[0], self.stride[1]],
                              [self.padding[0], self.padding[1]], self.groups)
