"""The timm model API shared by zoo's hierarchical (4-stage, stride 4..32) backbones.

A model using :class:`HierarchicalMixin` provides ``self.stages`` (an ``nn.Sequential`` of stages that
each have a ``grad_checkpointing`` flag), ``self.norm`` (applied to the last stage's output),
``self.head`` (a timm ``ClassifierHead``), ``num_classes`` / ``global_pool`` attributes, and sets:

* ``stem_name``: attribute of the stem module (what ``forward_stem`` calls and ``group_matcher`` names);
* ``stage_fmt``: the layout the stages run in, 'NHWC' or 'NCHW';
* ``no_weight_decay_suffixes``: parameter-name endings left out of weight decay.

The registration tails are shared too: :func:`create_hierarchical` and :func:`hierarchical_cfg`.
"""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ..checkpoint import build_with_local_file_hint, route_local_file_to_custom_load

__all__ = [
    "HierarchicalMixin",
    "create_hierarchical",
    "hierarchical_cfg",
    "init_weights_trunc_normal",
    "raise_official_problems",
    "rename_vmamba_legacy",
    "run_blocks",
    "stage_widths",
]

_OUTPUT_FMTS = ("NCHW", "NHWC")


def stage_widths(dims: Union[int, Sequence[int]], depths: Sequence[int], model_name: str) -> List[int]:
    """One width per stage: an int is stage 0's width, doubled per stage; a sequence must match ``depths``."""
    num_stages = len(depths)
    if isinstance(dims, int):
        return [dims * 2 ** i for i in range(num_stages)]
    widths = [int(d) for d in dims]
    if len(widths) != num_stages:
        raise ValueError(f"{model_name}: got {len(widths)} dims for {num_stages} stages (depths={tuple(depths)})")
    return widths


def raise_official_problems(family: str, leftover: Dict[str, Any], problems: List[str]) -> None:
    """The one error of ``official_kwargs_to_model_args``: every refused value, and the unknown kwargs."""
    if leftover:
        problems.append(f"unknown kwargs {sorted(leftover)}")
    if problems:
        raise ValueError(f"official {family} kwargs not supported: " + "; ".join(problems))


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """A stage's blocks, recomputed in the backward pass when gradient checkpointing is on."""
    if grad_checkpointing and not torch.jit.is_scripting():
        return checkpoint_seq(blocks, x)
    return blocks(x)


def init_weights_trunc_normal(m: nn.Module, norm_types: Tuple[Type[nn.Module], ...] = (nn.LayerNorm,)) -> None:
    """Linear weights truncated-normal (std 0.02) with zero bias; ``norm_types`` to weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, norm_types):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class HierarchicalMixin:
    """timm API (features, intermediates, classifier, grad checkpointing) over ``stem -> stages -> norm -> head``."""

    stem_name: str = "patch_embed"
    stage_fmt: str = "NHWC"
    no_weight_decay_suffixes: Tuple[str, ...] = (".A_logs", ".Ds")

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameters ending in ``no_weight_decay_suffixes`` (SSM A (log) and D, ...) are not decayed."""
        return {n for n, _ in self.named_parameters() if n.endswith(self.no_weight_decay_suffixes)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=rf"^{self.stem_name}",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)
        like = next(self.stages.parameters())  # the new head lives where the model does
        self.head.to(device=like.device, dtype=like.dtype).train(self.training)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the stage-0 input (stride 4, in ``stage_fmt``); override to check input first."""
        return getattr(self, self.stem_name)(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the normed final map (stride 32, in ``stage_fmt``)."""
        return self.norm(self.stages(self.forward_stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _to_output_fmt(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        if output_fmt == self.stage_fmt:
            return x
        if self.stage_fmt == "NHWC":
            return x.permute(0, 3, 1, 2).contiguous()
        return x.permute(0, 2, 3, 1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (after each stage's blocks, before the next downsample) and the final features.

        Args:
            indices: stages to return (int: the last n; None: all). norm: apply the final norm to the
                last stage's output. output_fmt: 'NCHW' or 'NHWC'.

        Returns:
            The intermediates, or (final normed features in ``stage_fmt``, intermediates).
        """
        if output_fmt not in _OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[:max_index + 1]
        intermediates = []
        x = self.forward_stem(x)
        last = len(self.stages) - 1
        i = -1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if (norm and i == last) else x
                intermediates.append(self._to_output_fmt(y, output_fmt))
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drops the stages after the last wanted one (and optionally the norm/head)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def create_hierarchical(
    model_cls: Type[nn.Module],
    variant: str,
    pretrained: bool,
    filter_fn: Callable[..., Dict[str, torch.Tensor]],
    **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a 4-stage model: features by stage getter, local official files
    loaded through the model's own ``load_pretrained`` (they pickle training configs)."""
    out_indices: Sequence[int] = kwargs.pop("out_indices", (0, 1, 2, 3))
    route_local_file_to_custom_load(kwargs)
    return build_with_local_file_hint(lambda: build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    ), variant)


def hierarchical_cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    """The default pretrained cfg of an ImageNet-1k 224 px hierarchical classifier; ``kwargs`` override.

    ``custom_load`` is on: released official files pickle a training config next to the weights, so they
    load through ``model.load_pretrained`` (the safe loader of :mod:`zoo.checkpoint`).
    """
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "classifier": "head.fc",
        "custom_load": True,
        **kwargs,
    }


# state-dict names of older official VMamba-codebase checkpoints (VMamba, MSVMamba), renamed as the
# official loader does before the current names are mapped
VMAMBA_LEGACY_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)ln_1\."), r"\1norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)self_attention\."), r"\1op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)


def rename_vmamba_legacy(key: str) -> str:
    """An older official VMamba-codebase key -> the current official name (other keys unchanged)."""
    for pattern, repl in VMAMBA_LEGACY_RENAMES:
        key = pattern.sub(repl, key)
    return key
