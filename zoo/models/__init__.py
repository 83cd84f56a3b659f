"""Model families; importing a module registers its models with timm."""
from . import convllava, mambavision, msvmamba, timm_families, vim, vmamba  # noqa: F401
