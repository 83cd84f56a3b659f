"""A zoo backbone as the vision tower of a transformers LlavaForConditionalGeneration (tiny, CPU, real photos)."""
from __future__ import annotations

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers zoo models)

transformers = pytest.importorskip("transformers", minversion="5.0")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real sample photos")

from transformers import AutoConfig, AutoModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from zoo.vlm import ImageProcessor  # noqa: E402
from zoo.vlm.hf import ZooVisionConfig, ZooVisionModel, llava_config  # noqa: E402

IMAGE_TOKEN = 63


def tiny_text_config():
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_llava(vision_config):
    torch.manual_seed(0)
    config = llava_config(vision_config, tiny_text_config(), image_token_index=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config).eval()


def prompt(config, batch):
    return torch.tensor([[1] + [IMAGE_TOKEN] * config.image_seq_length + [5, 6, 7]] * batch)


def photos(model, size):
    processor = ImageProcessor.from_model(model.model.vision_tower.timm_model, image_size=size)
    return processor([skimage_data.astronaut(), skimage_data.coffee()])["pixel_values"]


def greedy_without_cache(model, input_ids, pixel_values, steps):
    """Independent decoding loop: full forward each step, argmax of the last position."""
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits[:, -1]
        logits[:, IMAGE_TOKEN] = float("-inf")  # a generated image placeholder would need an image
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_auto_classes_know_the_zoo_vision_pair():
    config = AutoConfig.for_model("zoo_vision", architecture="test_vit", image_size=64)
    assert isinstance(config, ZooVisionConfig)
    assert (config.hidden_size, config.num_patches, config.patch_size, config.feature_layer) == (64, 16, 16, -2)
    assert isinstance(AutoModel.from_config(config), ZooVisionModel)


def test_llava_with_zoo_vit_tower_forward_generate_and_features():
    vision = ZooVisionConfig(architecture="test_vit", image_size=64)
    model = build_llava(vision)
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (-2, "default", 16)
    pixel_values = photos(model, 64)
    input_ids = prompt(cfg, 2)

    # the projector sees the penultimate block's patch tokens (class token dropped), read by a hook here
    timm_model = model.model.vision_tower.timm_model
    captured = {}
    handle = timm_model.blocks[-2].register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
    with torch.no_grad():
        timm_model.forward_features(pixel_values)
        feats = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                         vision_feature_select_strategy="default").pooler_output
    handle.remove()
    expected = model.model.multi_modal_projector(captured["x"][:, 1:])
    torch.testing.assert_close(torch.stack(list(feats)), expected, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        swapped = model(input_ids=input_ids, pixel_values=pixel_values.flip(0)).logits
    assert logits.shape == (2, input_ids.shape[1], 64)
    torch.testing.assert_close(swapped, logits.flip(0), rtol=1e-4, atol=1e-5)  # per-image, image actually used
    assert not torch.allclose(logits[0, -1], logits[1, -1])

    generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False,
                               suppress_tokens=[IMAGE_TOKEN])
    assert generated.shape == (2, input_ids.shape[1] + 4)
    assert torch.equal(generated, greedy_without_cache(model, input_ids, pixel_values, 4))


@pytest.mark.parametrize("architecture,size", [("test_convllava", 128), ("test_vim", 64)])
def test_llava_with_token_reduction_and_other_families(architecture, size):
    """Hierarchical (no class token: 'full' strategy) and Vim (middle class token moved first), with
    keep_tokens: LLaVA gets exactly image_seq_length tokens and generate() runs."""
    if not timm.is_model(architecture):
        pytest.skip(f"{architecture} is not registered (its family has not landed)")
    vision = ZooVisionConfig(architecture=architecture, image_size=size, keep_tokens=3)
    model = build_llava(vision)
    cfg = model.config
    has_cls = vision.has_class_token
    assert cfg.vision_feature_select_strategy == ("default" if has_cls else "full")
    assert cfg.image_seq_length == 3
    pixel_values = photos(model, size)
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    selected = out.hidden_states[cfg.vision_feature_layer]
    assert selected.shape == (2, 3 + int(has_cls), vision.hidden_size)
    input_ids = prompt(cfg, 2)
    generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False,
                               suppress_tokens=[IMAGE_TOKEN])
    assert torch.equal(generated, greedy_without_cache(model, input_ids, pixel_values, 3))


def test_save_and_reload_roundtrip(tmp_path):
    model = build_llava(ZooVisionConfig(architecture="test_convnext", image_size=64, keep_tokens=2))
    pixel_values = torch.randn(1, 3, 64, 64)
    input_ids = prompt(model.config, 1)
    with torch.no_grad():
        before = model(input_ids=input_ids, pixel_values=pixel_values).logits
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.config.vision_config, ZooVisionConfig)
    with torch.no_grad():
        after = reloaded(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(after, before)


def test_clear_errors_for_inconsistent_setups():
    vision = ZooVisionConfig(architecture="test_convnext", image_size=64)
    with pytest.raises(ValueError, match="no class token"):
        llava_config(vision, tiny_text_config(), vision_feature_select_strategy="default")
    model = AutoModel.from_config(ZooVisionConfig(architecture="test_vit", image_size=64))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), output_hidden_states=True)
    with pytest.raises(ValueError, match="embedding output"):
        out.hidden_states[0]
    with pytest.raises(ValueError, match="feature_layer=0"):
        ZooVisionConfig(architecture="test_vit", image_size=64, feature_layer=0)


def test_timm_wrapper_route_fails_as_reported():
    """Why zoo ships its own pair: the issue's TimmWrapperConfig-in-LlavaConfig recipe breaks (no hidden_size)."""
    from transformers import TimmWrapperConfig

    config = LlavaConfig(vision_config=TimmWrapperConfig(architecture="test_vit"), text_config=tiny_text_config())
    with pytest.raises(AttributeError, match="hidden_size"):
        LlavaForConditionalGeneration(config)


def test_multi_layer_selection_concatenates_shared_token_choice():
    """vision_feature_layer=[-2, -1] with keep_tokens: one token selection for both blocks, so LLaVA can
    concatenate them; the projector input is twice the width."""
    vision = ZooVisionConfig(architecture="test_vit", image_size=64, keep_tokens=4)
    torch.manual_seed(0)
    config = llava_config(vision, tiny_text_config(), image_token_index=IMAGE_TOKEN, vision_feature_layer=[-2, -1])
    model = LlavaForConditionalGeneration(config).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
        logits = model(input_ids=prompt(config, 2), pixel_values=pixel_values).logits
    penultimate, last = out.hidden_states[-2], out.hidden_states[-1]
    assert penultimate.shape == last.shape == (2, 5, 64)
    assert model.model.multi_modal_projector.linear_1.in_features == 128
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="width"):
        llava_config(ZooVisionConfig(architecture="test_convnext", image_size=64), tiny_text_config(),
                     vision_feature_layer=[-2, -1])
