"""zoo.vlm: zoo backbones as VLM vision encoders.

* ``ZooVisionTower``: LLaVA's vision-tower interface for any registered backbone.
* ``ImageProcessor``: CLIP-processor-like preprocessing from a model's ``pretrained_cfg``.
* ``VisionEncoder``: layer selection + training-free token reduction (FasterVLM and friends).
* ``DynamicTiler`` / ``TiledEncoder``: dynamic high-resolution tiling (4KHD, LLaVA-NeXT anyres) for any tower.
* ``zoo.vlm.hf``: a transformers vision model/config pair (``model_type='zoo_vision'``) for LLaVA.
* ``zoo.vlm.open_clip``: a zoo backbone as the image tower of an open_clip CLIP model.

The transformers and open_clip adapters import their libraries lazily (import the submodules explicitly).
"""
from .encoder import VisionEncoder, create_backbone
from .features import FeatureLayout, describe_backbone
from .processor import ImageProcessor
from .reduction import REDUCTIONS
from .tiling import DynamicTiler, TiledEncoder, TileSeparators, tiled_token_count
from .tower import TowerConfig, VisionTowerArgs, ZooVisionTower, build_vision_tower

__all__ = [
    "ZooVisionTower",
    "VisionTowerArgs",
    "TowerConfig",
    "build_vision_tower",
    "ImageProcessor",
    "VisionEncoder",
    "create_backbone",
    "FeatureLayout",
    "describe_backbone",
    "REDUCTIONS",
    "DynamicTiler",
    "TiledEncoder",
    "TileSeparators",
    "tiled_token_count",
]
