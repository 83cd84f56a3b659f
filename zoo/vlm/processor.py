"""``ImageProcessor``: CLIP-image-processor-like preprocessing from a timm ``pretrained_cfg``."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageProcessor", "BatchFeature", "MODES"]

MODES = ("pad", "resize", "crop")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

try:  # the same container CLIPImageProcessor returns, when transformers is installed
    from transformers import BatchFeature
except ImportError:  # pragma: no cover - transformers is optional

    class BatchFeature(dict):  # type: ignore[no-redef]
        """Minimal stand-in: a dict of tensors with ``.to``."""

        def __getattr__(self, item: str) -> Any:
            try:
                return self[item]
            except KeyError as err:
                raise AttributeError(item) from err

        def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
            return BatchFeature({k: v.to(*args, **kwargs) for k, v in self.items()})


ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


class ImageProcessor:
    """Turns images of any size and aspect ratio into normalised ``pixel_values`` at one square resolution.

    Modes:
        * ``'pad'``: pad to a square with the mean colour (LLaVA's ``image_aspect_ratio='pad'``), then resize.
          Nothing is cropped and the aspect ratio is kept.
        * ``'resize'``: resize straight to ``size`` x ``size`` (stretches non-square images).
        * ``'crop'``: resize the short side to ``size`` and centre-crop (CLIPImageProcessor's default).

    ``image_mean``, ``image_std``, ``size`` and ``crop_size`` are exposed under the names LLaVA-style code reads.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        mode: str = "pad",
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}; accepted: {', '.join(_RESAMPLE)}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size}")
        self.image_size = int(image_size)
        self.image_mean = [float(m) for m in mean]
        self.image_std = [float(s) for s in std]
        self.interpolation = interpolation
        self.mode = mode

    @classmethod
    def from_pretrained_cfg(
        cls, pretrained_cfg: Dict[str, Any], image_size: Optional[int] = None, mode: str = "pad"
    ) -> "ImageProcessor":
        size = image_size or int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        interpolation = pretrained_cfg.get("interpolation") or "bicubic"
        if interpolation == "random":
            interpolation = "bicubic"
        return cls(size, pretrained_cfg.get("mean", (0.485, 0.456, 0.406)),
                   pretrained_cfg.get("std", (0.229, 0.224, 0.225)), interpolation, mode)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, image_size: Optional[int] = None, mode: str = "pad"
    ) -> "ImageProcessor":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        return cls.from_pretrained_cfg(cfg, image_size=image_size, mode=mode)

    # names LLaVA-style code reads
    @property
    def size(self) -> Dict[str, int]:
        return {"shortest_edge": self.image_size}

    @property
    def crop_size(self) -> Dict[str, int]:
        return {"height": self.image_size, "width": self.image_size}

    def __repr__(self) -> str:
        return (f"ImageProcessor(image_size={self.image_size}, mode={self.mode!r}, interpolation="
                f"{self.interpolation!r}, mean={self.image_mean}, std={self.image_std})")

    @staticmethod
    def to_pil(image: ImageLike) -> Image.Image:
        """RGB PIL image from a PIL image, an HWC/HW uint8 array, or a CHW tensor (uint8 or float in [0, 1])."""
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            if t.ndim != 3 or t.shape[0] not in (1, 3):
                raise ValueError(f"tensor images must be (C, H, W) with C in (1, 3), got {tuple(t.shape)}")
            if t.is_floating_point():
                t = (t.clamp(0, 1) * 255).round()
            image = t.to(torch.uint8).permute(1, 2, 0).numpy()
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
                raise ValueError(f"array images must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
            if arr.dtype != np.uint8:
                if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
                    arr = arr * 255.0
                arr = np.clip(arr, 0, 255).round().astype(np.uint8)
            return Image.fromarray(arr).convert("RGB")
        raise TypeError(
            f"unsupported image type {type(image).__name__}; accepted: PIL.Image, numpy array, torch tensor")

    def pad_to_square(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        fill = tuple(int(m * 255) for m in self.image_mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        resample = _RESAMPLE[self.interpolation]
        s = self.image_size
        if self.mode == "pad":
            return self.pad_to_square(image).resize((s, s), resample)
        if self.mode == "resize":
            return image.resize((s, s), resample)
        w, h = image.size  # crop: short side to s (long side floored, as torchvision), then centre crop
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        image = image.resize((nw, nh), resample)
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        return image.crop((left, top, left + s, top + s))

    def preprocess_one(self, image: ImageLike) -> torch.Tensor:
        pil = self._resize_and_crop(self.to_pil(image))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (x - mean) / std

    def preprocess(self, images: Union[ImageLike, Iterable[ImageLike]], return_tensors: Optional[str] = "pt",
                   **_: Any) -> BatchFeature:
        """``{'pixel_values': (B, 3, size, size) float tensor}`` (a list of (3, size, size) if return_tensors=None)."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; accepted: 'pt' or None")
        single = isinstance(images, (Image.Image, np.ndarray)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3)
        batch: List[ImageLike] = [images] if single else list(images)
        if not batch:
            raise ValueError("no images given")
        pixels = [self.preprocess_one(im) for im in batch]
        return BatchFeature({"pixel_values": torch.stack(pixels) if return_tensors == "pt" else pixels})

    __call__ = preprocess
