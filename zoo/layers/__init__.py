"""Layers shared by the zoo's model families (the zoo's counterpart of ``timm.layers``).

``zoo.layers.ssm``: the selective-state-space (Mamba) pieces -- init, the fp32 rule, the dt/B/C
projection, a 1-D scan-direction block, 2-D cross-scan/merge, and the scan entry points over
:mod:`zoo.ops` (TorchScript-ignored, FX leaves). See that module's docstring for the API.
"""
from . import ssm
from .ssm import *  # noqa: F401,F403 - the public names are ssm.__all__

__all__ = list(ssm.__all__)
