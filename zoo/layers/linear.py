"""``Linear``: the ``nn.Linear`` of the zoo's models, with the same parameters and state-dict keys.

Its forward is :func:`zoo.ops.mixer.linear`: ``F.linear`` everywhere, except for float32 CPU inference
(gradients off, no autocast) on a CPU where the zoo's register-tile GEMM beats torch's BLAS: AVX2 or AVX-512
and not Intel, so MKL runs its Zen kernels (``zoo.ops.mixer._tiles_beat_blas_gemm``, docs/kernels.md).
Training, other dtypes and devices, TorchScript and FX tracing always take ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.mixer import linear

__all__ = ["Linear", "use_zoo_linear_"]


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU inference may run on ``zoo_scan::grouped_linear`` (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the F.linear line
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_zoo_linear_(module: nn.Module) -> nn.Module:
    """Gives every plain ``nn.Linear`` inside ``module`` (timm's ``Mlp`` / ``Attention`` layers, say) the forward
    of :class:`Linear`, in place: its class becomes ``Linear``, which adds no state, so parameters, state-dict
    keys and hooks stay as they are. Subclasses of ``nn.Linear`` are left alone. Returns ``module``."""
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = Linear
    return module
