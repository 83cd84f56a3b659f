"""Layers shared by the zoo's model families (the zoo's counterpart of ``timm.layers``).

``zoo.layers.ssm``: the selective-state-space (Mamba) pieces -- init, the fp32 rule, the dt/B/C
projection, a 1-D scan-direction block, 2-D cross-scan/merge, and the scan entry points over
:mod:`zoo.ops` (TorchScript-ignored, FX leaves). See that module's docstring for the API.

``zoo.layers.conv``: :class:`StridedConv2d`, the ``nn.Conv2d`` for strided, zero-padded convs (it steers
around a oneDNN bf16 weight-gradient bug at one-position outputs; see that module's docstring).

``zoo.layers.linear``: :class:`Linear`, the models' ``nn.Linear``, whose float32 CPU inference runs on the zoo's
GEMM tiles where those beat torch's BLAS.
"""
from . import conv, linear, ssm
from .conv import StridedConv2d, strided_conv2d
from .linear import Linear, use_zoo_linear_
from .ssm import *  # noqa: F401,F403 - the public names are ssm.__all__

__all__ = list(conv.__all__) + list(linear.__all__) + list(ssm.__all__)
