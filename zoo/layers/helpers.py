"""Small helpers shared by the zoo's model files."""
from typing import Callable, TypeVar

import torch
from timm.layers import register_notrace_function

__all__ = ["channels_last", "leaf_function"]

F = TypeVar("F", bound=Callable)


def leaf_function(fn: F) -> F:
    """Marks ``fn`` as opaque to TorchScript (``torch.jit.ignore``) and to timm's FX tracing (a leaf).

    For checks and shape logic that must see real values: under ``torch.jit.script`` the function
    runs as Python, and an FX graph records one call to it instead of tracing through it, so a clear
    ``ValueError`` on bad input survives scripting and tracing. Callers must pass every argument
    (TorchScript drops the defaults of ignored functions), and its name must not start with ``_``
    (timm's tracer wraps only public names of the caller's module). Put ``@torch.fx.wrap`` above it
    so that calls from helpers of the defining module (not only from module forwards) stay leaves::

        @torch.fx.wrap
        @leaf_function
        def check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor: ...
    """
    return register_notrace_function(torch.jit.ignore(fn))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) stored channels-last: the same values and shape, another memory order.

    For a stem: a conv given such an input writes channels-last output, so the permute to (B, H, W, C)
    after it is a contiguous view (a LayerNorm over C then copies nothing), and oneDNN takes its
    channels-last path, which for a stem's three input channels measured 1.5-5x faster than its NCHW
    one on a Xeon (docs/kernels.md). Results are unchanged up to the conv's summation order.
    """
    return x.contiguous(memory_format=torch.channels_last)
