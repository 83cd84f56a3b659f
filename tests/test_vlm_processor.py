"""zoo.vlm.ImageProcessor against torchvision/timm pipelines built independently from the same settings."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import zoo  # noqa: F401  (registers zoo models)
from zoo.vlm import ImageProcessor

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real sample photos")


def photos():
    # square RGB, wide RGB, tall RGB crop, square grayscale
    return [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.rocket(), skimage_data.camera()]


def normalise(processor):
    return T.Compose([T.ToTensor(), T.Normalize(processor.image_mean, processor.image_std)])


def test_crop_mode_matches_timm_eval_transform_from_pretrained_cfg():
    model = timm.create_model("test_vitamin" if timm.is_model("test_vitamin") else "test_vit")
    processor = ImageProcessor.from_model(model, image_size=48, mode="crop")
    cfg = resolve_data_config({}, model=model)
    assert processor.image_mean == pytest.approx(list(cfg["mean"]))
    assert processor.image_std == pytest.approx(list(cfg["std"]))
    assert processor.interpolation == cfg["interpolation"]
    reference = create_transform(input_size=(3, 48, 48), interpolation=cfg["interpolation"], mean=cfg["mean"],
                                 std=cfg["std"], crop_pct=1.0)
    out = processor(photos())["pixel_values"]
    assert out.shape == (4, 3, 48, 48) and out.dtype == torch.float32
    for i, arr in enumerate(photos()):
        expected = reference(Image.fromarray(arr).convert("RGB"))
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_resize_mode_matches_torchvision_stretch():
    processor = ImageProcessor(40, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear", mode="resize")
    reference = T.Compose([T.Resize((40, 40), interpolation=InterpolationMode.BILINEAR), normalise(processor)])
    out = processor(photos())["pixel_values"]
    for i, arr in enumerate(photos()):
        torch.testing.assert_close(out[i], reference(Image.fromarray(arr).convert("RGB")), rtol=0, atol=1e-5)


def test_pad_mode_pads_to_square_with_mean_then_resizes():
    processor = ImageProcessor(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert processor.mode == "pad"
    fill = tuple(int(m * 255) for m in processor.image_mean)
    for arr in photos():
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        padded = T.functional.pad(img, [left, top, side - w - left, side - h - top], fill=fill)
        resize = T.Resize((64, 64), interpolation=InterpolationMode.BICUBIC)
        expected = T.Compose([resize, normalise(processor)])(padded)
        got = processor(arr)["pixel_values"][0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the wide photo: the bands above and below the content are the (normalised) mean colour, i.e. ~0
    wide = processor(skimage_data.coffee())["pixel_values"][0]  # 600x400 -> 100 px bands of 600
    assert wide[:, :8].abs().max() < 0.02 and wide[:, -8:].abs().max() < 0.02
    assert wide[:, 24:40].abs().mean() > 0.1


def test_input_types_agree_and_bad_inputs_are_rejected():
    processor = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), mode="resize")
    arr = skimage_data.chelsea()
    from_array = processor(arr)["pixel_values"]
    from_pil = processor(Image.fromarray(arr))["pixel_values"]
    from_uint8_tensor = processor(torch.from_numpy(arr).permute(2, 0, 1))["pixel_values"]
    from_float_tensor = processor(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)["pixel_values"]
    for other in (from_pil, from_uint8_tensor, from_float_tensor):
        torch.testing.assert_close(other, from_array)
    gray = processor(skimage_data.camera())["pixel_values"]
    assert gray.shape == (1, 3, 32, 32) and torch.equal(gray[0, 0], gray[0, 1])
    assert isinstance(processor([arr, arr], return_tensors=None)["pixel_values"], list)
    with pytest.raises(ValueError, match="mode"):
        ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, mode="letterbox")
    with pytest.raises(TypeError, match="unsupported image type"):
        processor("astronaut.png")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        processor(torch.zeros(2, 5, 8, 8))
    with pytest.raises(ValueError, match="return_tensors"):
        processor(arr, return_tensors="np")
    # LLaVA reads these names
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 32}
    assert np.allclose(processor.image_mean, 0.5)
