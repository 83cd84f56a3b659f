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


# PIL modes whose samples are 8-bit: PIL's own convert('RGB') is exact for them
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# a float value this far outside [0, 1] is not resampling overshoot but another convention (0..255)
_FLOAT_TOLERANCE = 1e-3


def pil_to_array(image: Image.Image) -> np.ndarray:
    """Samples of a high-bit-depth PIL image. PIL stores 16-bit PNG/TIFF greyscale as 'I;16*' or as 'I' (int32);
    'I' is taken as 16-bit data, as PIL's decoders produce it, and values outside 0..65535 are refused."""
    arr = np.asarray(image)
    if image.mode.startswith("I;16"):
        return arr.astype(np.uint16)
    if image.mode == "I":
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"PIL mode 'I' image with values {arr.min()}..{arr.max()}: read as 16-bit data, "
                             "accepted 0..65535; pass a uint16/uint8 array or a float array in [0, 1]")
        return arr.astype(np.uint16)
    if image.mode == "F":
        return arr.astype(np.float32)
    raise ValueError(f"unsupported PIL image mode {image.mode!r}; convert it to 'RGB' or 'L' first")


def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """float64 copy of ``arr`` in [0, 1], one rule per dtype (torchvision's ``ToDtype(scale=True)`` rule):

    * bool: False/True -> 0/1;
    * unsigned and signed integers: divided by the dtype's maximum (uint8 255, uint16 65535, int16 32767, ...);
      negative values are refused. For int32/int64, whose range no image fills, content that would scale to a
      black image (max <= 65535) is refused too: say which range is meant with a uint8 or uint16 array;
    * floats: already in [0, 1] (values within 1e-3 outside are clipped: resampling overshoot); anything further
      outside, NaN and inf are refused rather than guessed at (a 0..255 float image must be divided by 255).
    """
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0:
            raise ValueError(f"{arr.dtype} image has negative values (min {lo}); integer images must be >= 0")
        if info.bits >= 32 and hi <= 65535:
            raise ValueError(
                f"{arr.dtype} image with values {lo}..{hi}: scaling by the {arr.dtype} range (torchvision's rule) "
                "would give a black image; pass uint8 for 0..255 data or uint16 for 0..65535 data")
        return arr.astype(np.float64) / float(info.max)
    if np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"image contains NaN or inf ({int((~np.isfinite(x)).sum())} values)")
        lo, hi = float(x.min()), float(x.max())
        if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"float image with values {lo:g}..{hi:g}: float images must be in [0, 1]; divide 0..255 data by "
                "255 (or pass uint8)")
        return np.clip(x, 0.0, 1.0)
    raise TypeError(f"unsupported image dtype {arr.dtype}; accepted: bool, integer or float arrays/tensors")


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
        """RGB PIL image from a PIL image (any mode, 16-bit and float included), an HxW / HxWx{1,3,4} array or a
        (C, H, W) tensor with C in (1, 3, 4). See ``to_unit_range`` for how each dtype is scaled."""
        if isinstance(image, Image.Image):
            if 0 in image.size:
                raise ValueError(f"empty image: PIL image of size {image.size[0]}x{image.size[1]}")
            if image.mode in _EIGHT_BIT_MODES:
                return image.convert("RGB")  # 8-bit modes (palette, RGBA, CMYK, ...): PIL's own conversion
            image = pil_to_array(image)
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
                raise ValueError(f"tensor images must be (C, H, W) with C in (1, 3, 4), got {tuple(image.shape)}")
            t = image.detach().cpu()
            t = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t  # numpy has no bfloat16
            image = t.permute(1, 2, 0).numpy()
        elif not isinstance(image, np.ndarray):
            raise TypeError(
                f"unsupported image type {type(image).__name__}; accepted: PIL.Image, numpy array, torch tensor")
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"array images must be HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped), got shape {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"empty image: {arr.shape[0]}x{arr.shape[1]} pixels")
        unit = to_unit_range(arr)
        rgb = np.round(unit * 255.0).astype(np.uint8)  # 8 bits after scaling, as transformers' PIL resize path
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB")

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
        return self.normalise(self._resize_and_crop(self.to_pil(image)))

    def normalise(self, pil: Image.Image) -> torch.Tensor:
        """(3, H, W) float tensor of an RGB PIL image: scaled to [0, 1], then (x - mean) / std."""
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
