"""zoo: vision backbones (Vim, MSVMamba, ConvLLaVA ConvNeXt and timm's families) as timm models.

``import zoo`` registers every zoo model with timm, so ``timm.create_model(name)`` works for them.
"""
from . import checkpoint, ops
from . import models  # noqa: F401  (registers the model families with timm)
from .registry import create_model, list_families, list_models, model_info

__version__ = "0.1.0"
__all__ = ["create_model", "list_families", "list_models", "model_info", "checkpoint", "ops", "__version__"]
