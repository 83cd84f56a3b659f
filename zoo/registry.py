"""The zoo's model registry (filled in by the registry work: families, params, strides)."""
from __future__ import annotations

from typing import Any, List

import timm
import torch.nn as nn

__all__ = ["create_model", "list_models"]


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Creates a zoo (or any timm) model by name through timm's builder."""
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def list_models(family: str | None = None) -> List[str]:
    raise NotImplementedError("list_models is provided by the registry work in progress")
