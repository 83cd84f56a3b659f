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
from torchvision.transforms import v2 as TV2

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


# --- bit depths and dtypes (issue 15 item 8): each dtype scaled by its range, what cannot be meant refused -----

def _unit(processor_out):
    """Back from normalised pixel_values (mean 0, std 1 processors) to [0, 1]."""
    return processor_out["pixel_values"][0]


def _gradient16(h=64, w=256):
    return np.linspace(0, 65535, h * w).round().reshape(h, w).astype(np.uint16)


def _png(array, tmp_path, name):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return Image.open(path)


def test_16bit_png_is_scaled_by_its_range(tmp_path):
    processor = ImageProcessor(32, (0.0,) * 3, (1.0,) * 3, "bilinear", mode="resize")
    grad = _gradient16()
    png = _png(grad, tmp_path, "gradient16.png")
    assert png.mode.startswith("I;16")  # PIL's 16-bit greyscale mode
    out = _unit(processor(png))
    assert abs(out.mean().item() - 0.5) < 0.01  # full-range gradient: mean 0.5 (was 0.938: clipped at 255)
    # oracle: torchvision's dtype scaling to [0, 1], then the already-verified 8-bit path
    scaled = TV2.ToDtype(torch.float32, scale=True)(torch.from_numpy(grad.astype(np.int32)).to(torch.uint16)[None])
    as_uint8 = (scaled[0].numpy() * 255).round().astype(np.uint8)
    expected = _unit(processor(as_uint8))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for same in (grad, torch.from_numpy(grad.astype(np.int32)).to(torch.uint16)[None],
                 Image.fromarray(grad.astype(np.int32))):  # uint16 array, uint16 tensor, PIL mode 'I'
        torch.testing.assert_close(_unit(processor(same)), expected, rtol=0, atol=1e-6)


def test_float_images_are_unit_range_and_others_refused():
    processor = ImageProcessor(16, (0.0,) * 3, (1.0,) * 3, mode="resize")
    arr = np.random.default_rng(0).random((20, 24, 3))
    as_uint8 = (arr * 255).round().astype(np.uint8)
    torch.testing.assert_close(_unit(processor(arr)), _unit(processor(as_uint8)), rtol=0, atol=1e-6)
    one_bright = arr.copy()
    one_bright[0, 0, 0] = 1.5  # one value above 1: was read as a 0..255 image
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        processor(one_bright)
    with pytest.raises(ValueError, match=r"divide 0..255 data by 255"):
        processor(torch.full((3, 8, 8), 128.0))  # was a white image
    overshoot = arr.copy()
    overshoot[0, 0, 0] = 1.0 + 1e-4  # resampling overshoot is clipped, not refused
    assert processor(overshoot)["pixel_values"].max() <= 1.0
    pil_float = Image.fromarray(arr[..., 0].astype(np.float32))  # PIL mode 'F'
    torch.testing.assert_close(_unit(processor(pil_float)), _unit(processor(as_uint8[..., 0])), rtol=0, atol=1e-6)


def test_integer_tensors_scaled_by_dtype_range_never_wrapped():
    processor = ImageProcessor(16, (0.0,) * 3, (1.0,) * 3, mode="resize")
    g = torch.Generator().manual_seed(0)
    for dtype, high in ((torch.int16, 32767), (torch.int32, 2**31 - 1), (torch.int64, 2**63 - 1)):
        t = (torch.rand(3, 12, 12, generator=g, dtype=torch.float64) * high).to(dtype)
        t[0, 0, 0] = high  # full range content
        oracle = TV2.ToDtype(torch.float32, scale=True)(t).double().clamp(0, 1)  # torchvision's rule
        torch.testing.assert_close(_unit(processor(t)), _unit(processor(oracle)), rtol=0, atol=1e-6)
    wrapped = torch.tensor([[[300]]], dtype=torch.int64).expand(3, 8, 8)  # was 300 % 256 = 44
    with pytest.raises(ValueError, match="pass uint8 for 0..255 data or uint16"):
        processor(wrapped)
    with pytest.raises(ValueError, match="negative"):
        processor(torch.full((3, 4, 4), -5, dtype=torch.int16))


@pytest.mark.parametrize("bad,match", [
    (np.full((8, 8, 3), np.nan, np.float32), "NaN or inf"),
    (torch.full((3, 8, 8), float("inf")), "NaN or inf"),
    (np.zeros((0, 0, 3), np.uint8), "empty image"),
    (torch.zeros(3, 0, 5, dtype=torch.uint8), "empty image"),
    (Image.new("RGB", (0, 0)), "empty image"),
    (np.zeros((8, 8, 2), np.uint8), "HxWx3"),
    (torch.zeros(2, 8, 8), r"C in \(1, 3, 4\)"),
])
def test_images_that_cannot_be_meant_are_refused(bad, match):
    processor = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, mode="resize")
    with pytest.raises(ValueError, match=match):
        processor(bad)


def test_rgba_and_single_channel_tensors_follow_pil_conversion():
    processor = ImageProcessor(16, (0.0,) * 3, (1.0,) * 3, mode="resize")
    rgba = skimage_data.astronaut()[:64, :48]
    rgba = np.concatenate([rgba, np.full(rgba.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    expected = normalise(processor)(T.Resize((16, 16), InterpolationMode.BICUBIC)(Image.fromarray(rgba).convert("RGB")))  # PIL drops alpha
    torch.testing.assert_close(_unit(processor(torch.from_numpy(rgba).permute(2, 0, 1))), expected, rtol=0, atol=1e-5)
    gray = skimage_data.camera()[:40, :40]
    torch.testing.assert_close(_unit(processor(torch.from_numpy(gray)[None])),
                               _unit(processor(Image.fromarray(gray))), rtol=0, atol=0)
