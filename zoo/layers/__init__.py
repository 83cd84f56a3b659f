"""Layers shared by the zoo's model families (the zoo's counterpart of ``timm.layers``).

``zoo.layers.ssm``: the selective-state-space (Mamba) pieces -- init, the fp32 rule, the dt/B/C
projection, a 1-D scan-direction block, 2-D cross-scan/merge, and the scan entry points over
:mod:`zoo.ops` (TorchScript-ignored, FX leaves). See that module's docstring for the API.
"""
from .ssm import (
    ScanDirection1d,
    ScanInputs,
    cross_merge_2d,
    cross_scan_2d,
    dt_bc_projection,
    dt_bc_projection_stacked,
    fp32_or_wider,
    init_dt_bias_,
    init_dt_proj_weight_,
    init_stacked_ssm_,
    inverse_softplus,
    s4d_real_A_log,
    scan,
    scan_bidirectional,
    scan_multi_direction,
    ssm_parameters,
    stacked_ssm_inputs,
)

__all__ = [
    "ScanDirection1d",
    "ScanInputs",
    "cross_merge_2d",
    "cross_scan_2d",
    "dt_bc_projection",
    "dt_bc_projection_stacked",
    "fp32_or_wider",
    "init_dt_bias_",
    "init_dt_proj_weight_",
    "init_stacked_ssm_",
    "inverse_softplus",
    "s4d_real_A_log",
    "scan",
    "scan_bidirectional",
    "scan_multi_direction",
    "ssm_parameters",
    "stacked_ssm_inputs",
]
