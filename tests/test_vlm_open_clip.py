"""A zoo backbone as the image tower of an open_clip CLIP model built from a config dict."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401  (registers zoo models)

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real sample photos")

from zoo.vlm import ImageProcessor  # noqa: E402
from zoo.vlm.open_clip import ZooImageTower, create_open_clip_model  # noqa: E402

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
CAPTIONS = ["a photo of an astronaut", "a cup of coffee", "a cat"]


def real_photos(size, model):
    processor = ImageProcessor.from_model(model, image_size=size, mode="crop")
    return processor([skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()])["pixel_values"]


@pytest.mark.parametrize("name,size", [("test_vit", 96), ("test_convllava", 128), ("test_vim", 48)])
def test_zoo_image_tower_encodes_images_and_texts(name, size):
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered (its family has not landed)")
    torch.manual_seed(0)
    cfg = dict(embed_dim=16, vision_cfg=dict(zoo_model_name=name, image_size=size), text_cfg=TEXT_CFG)
    model = create_open_clip_model(cfg).eval()
    assert isinstance(model.visual, ZooImageTower) and model.visual.image_size == (size, size)
    images = real_photos(size, model.visual.trunk)
    text = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)  # the BPE vocabulary ships with open_clip
    with torch.no_grad():
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(text, normalize=True)
        out = model(images, text)
        # reference: the backbone's own pooled features (final norm + head pooling) through the projection
        pooled = model.visual.trunk(images)
        expected = F.normalize(model.visual.proj(pooled), dim=-1)
    assert image_emb.shape == text_emb.shape == (3, 16)
    torch.testing.assert_close(image_emb, expected, rtol=1e-4, atol=1e-5)
    image_out, text_out = out[0], out[1]
    torch.testing.assert_close(image_out, image_emb)
    torch.testing.assert_close(text_out, text_emb)


def test_contrastive_step_trains_projection_with_locked_trunk():
    torch.manual_seed(0)
    model = create_open_clip_model(dict(embed_dim=16, vision_cfg=dict(zoo_model_name="test_convnext", image_size=64),
                                        text_cfg=TEXT_CFG))
    model.lock_image_tower()
    images = torch.randn(3, 3, 64, 64)
    text = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    image_features, text_features, logit_scale = model(images, text)[:3]
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(3)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    assert model.visual.proj.weight.grad is not None and model.visual.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.visual.trunk.parameters())


def test_output_tokens_with_keep_tokens_and_native_timm_route():
    torch.manual_seed(0)
    model = create_open_clip_model(dict(
        embed_dim=16, text_cfg=TEXT_CFG,
        vision_cfg=dict(zoo_model_name="test_vit", image_size=64, output_tokens=True, keep_tokens=5)))
    pooled, tokens = model.visual(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, 16) and tokens.shape == (2, 5, 64)
    # open_clip's own timm adapter also takes a zoo model by name (at its default size)
    native = open_clip.CLIP(embed_dim=16, text_cfg=TEXT_CFG,
                            vision_cfg=dict(timm_model_name="test_convnext", timm_pool="", timm_proj="linear"))
    assert native.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 16)
    with pytest.raises(ValueError, match="zoo_model_name"):
        create_open_clip_model(dict(embed_dim=16, vision_cfg=dict(image_size=64), text_cfg=TEXT_CFG))
    with pytest.raises(ValueError, match="unknown vision_cfg"):
        create_open_clip_model(dict(embed_dim=16, vision_cfg=dict(zoo_model_name="test_vit", layers=3),
                                    text_cfg=TEXT_CFG))
