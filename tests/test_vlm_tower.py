"""zoo.vlm LLaVA-style tower and token reduction, over every registered family's test variant.

Families are picked up from the registry (``zoo.registry.list_test_models``) plus timm's ``test_vit`` (the
ViT with class token + attention that FasterVLM's rule needs), so a family that lands is tested with no new
code here. References are independent of zoo.vlm: the backbone's own modules read through forward hooks
(the mechanism timm's ``features_only`` uses), naive attention weights, and per-token loops.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers zoo models)
from zoo.registry import list_test_models, model_info
from zoo.vlm import ZooVisionTower

EXTRA_MODELS = ["test_vit"]  # timm's ViT: class token + softmax attention


def tiny_models():
    return list_test_models() + [m for m in EXTRA_MODELS if timm.is_model(m)]


def input_size_for(name: str) -> int:
    """A small input size that still leaves a >= 2x2 grid at every layer."""
    if name in EXTRA_MODELS:
        return 64
    info = model_info(name)
    red = info.max_reduction
    size = max(min(info.input_size[-1], 64), 2 * red)
    return -(-size // red) * red


_TOWERS = {}


def tower_for(name: str, **options) -> ZooVisionTower:
    """Towers are cached per (model, options): building is cheap but not free, and tests only read them."""
    key = (name, tuple(sorted(options.items())))
    if key not in _TOWERS:
        torch.manual_seed(0)
        _TOWERS[key] = ZooVisionTower(name, image_size=input_size_for(name), **options)
    return _TOWERS[key]


def images(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = input_size_for(name)
    return torch.randn(batch, 3, s, s, generator=g)


def hooked_layer_output(model, x, module_name):
    """A layer's raw output captured by a forward hook on the module ``feature_info`` names."""
    module = model.get_submodule(module_name)
    captured = {}
    handle = module.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        handle.remove()
    return captured["out"]


def reference_tokens(tower: ZooVisionTower, x: torch.Tensor, position: int):
    """(prefix, patches) of one layer from a forward hook on the module ``feature_info`` names.

    Each layout is read from the family's documented behaviour, not from zoo.vlm: NCHW / NHWC stage maps,
    timm's EfficientViM stages returning (features, downsampled, state), ViT's leading prefix tokens, and
    Vim's class token in the middle of the sequence (official Vim: ``token_position = M // 2``).
    A layout this function does not know fails the test instead of skipping the value check.
    """
    model = tower.vision_tower
    out = hooked_layer_output(model, x, model.feature_info[position]["module"])
    channels = model.feature_info[position]["num_chs"]
    if isinstance(out, tuple) and type(model).__name__ == "EfficientViM":
        out = out[0]  # timm's EfficientVimStage returns (stage features, next stage's input, state)
    assert isinstance(out, torch.Tensor), f"no reference for {type(model).__name__}'s {type(out).__name__} output"
    if out.ndim == 4 and out.shape[1] == channels:  # NCHW stage map
        return None, out.flatten(2).transpose(1, 2)
    if out.ndim == 4 and out.shape[-1] == channels:  # NHWC stage map (MSVMamba keeps channels last)
        return None, out.flatten(1, 2)
    if out.ndim == 3 and isinstance(model, timm.models.VisionTransformer):
        p = model.num_prefix_tokens
        return out[:, :p], out[:, p:]
    if out.ndim == 3 and type(model).__name__ == "Vim":
        m = out.shape[1] - 1  # patch tokens
        i = {"middle": m // 2, "first": 0}[model.cls_position]
        return out[:, i:i + 1], torch.cat([out[:, :i], out[:, i + 1:]], dim=1)
    raise AssertionError(f"no reference layout for {type(model).__name__} output {tuple(out.shape)}")


def assert_close_to_scale(actual, expected, rel=1e-4):
    """Close relative to the reference's magnitude: some tiny inits give activations of 1e-8, where a fixed
    atol of 1e-5 would accept anything."""
    assert expected.abs().max() > 0, "an all-zero reference checks nothing"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


@pytest.mark.parametrize("name", tiny_models())
def test_tower_shapes_and_values_per_family(name):
    tower = tower_for(name)
    layout = tower.encoder.layout
    x = images(name)
    n_layers = layout.num_layers
    # token models: LLaVA's select_layer (-2 penultimate, -1 last); hierarchical: select_stage (last, first)
    choices = [dict(), dict(select_layer=-1)] if layout.kind == "tokens" else [dict(), dict(select_stage=0)]
    features = ("patch", "cls_patch") if layout.has_class_token else ("cls_patch",)
    for choice in choices:
        t = tower_for(name, **choice)
        if t is not tower:
            t.vision_tower.load_state_dict(tower.vision_tower.state_dict())
        for feature in features:
            t.select_feature = feature  # the attribute LLaVA's feature_select reads
            out = t(x)
            prefix = 1 if (feature == "cls_patch" and layout.has_class_token) else 0
            assert out.shape == (2, t.num_patches + prefix, t.hidden_size)
            assert t.num_patches == t.num_patches_per_side ** 2
            pos = t.encoder.position
            assert t.hidden_size == layout.channels[pos]
            if layout.kind == "tokens":
                expected_pos = n_layers + choice.get("select_layer", -2)  # LLaVA's default: penultimate
            else:
                expected_pos = choice.get("select_stage", -1) % n_layers
            assert pos == expected_pos
            ref_prefix, ref_patches = reference_tokens(t, x, pos)
            assert_close_to_scale(out[:, prefix:], ref_patches)
            if prefix:
                assert_close_to_scale(out[:, :1], ref_prefix[:, :1])
        t.select_feature = "patch"


@pytest.mark.parametrize("name", tiny_models())
def test_keep_tokens_exact_count_original_order(name):
    """keep_tokens=N gives exactly N of the unreduced tokens, in their original order, chosen by the
    family's documented rule (recomputed here naively)."""
    full = tower_for(name)
    layout = full.encoder.layout
    x = images(name, seed=1)
    n = full.num_patches
    keep = max(1, n // 2)
    reduced = tower_for(name, keep_tokens=keep)
    reduced.vision_tower.load_state_dict(full.vision_tower.state_dict())
    out = reduced(x)
    assert out.shape == (2, keep, full.hidden_size) and reduced.num_patches == keep
    expected_rule = "cls_attention" if name == "test_vit" else (
        "cls_similarity" if layout.has_class_token else "deviation")
    assert reduced.encoder.reduction == expected_rule

    tokens = full(x)
    with_cls = tower_for(name, select_feature="cls_patch")
    with_cls.vision_tower.load_state_dict(full.vision_tower.state_dict())
    cls_tok = with_cls(x)[:, 0] if layout.has_class_token else None
    for b in range(2):
        # where each kept token sits among the unreduced ones
        dist = torch.cdist(out[b].double(), tokens[b].double())
        idx = dist.argmin(dim=1)
        assert torch.all(dist.min(dim=1).values < 1e-4)
        assert torch.all(idx[1:] > idx[:-1]), "kept tokens must keep their original order"
        if expected_rule == "deviation":
            mean = tokens[b].double().mean(0)
            scores = torch.stack([torch.linalg.vector_norm(t.double() - mean) for t in tokens[b]])
        elif expected_rule == "cls_similarity":
            c = cls_tok[b].double()
            scores = torch.stack([torch.dot(t.double(), c) / (t.double().norm() * c.norm()) for t in tokens[b]])
        else:
            continue  # FasterVLM: checked against materialised attention in its own test
        assert set(idx.tolist()) == set(scores.topk(keep).indices.tolist())


def naive_cls_attention(model, x, block):
    """Attention weights of one block, from the materialised softmax (fused SDPA switched off)."""
    attn = model.blocks[block].attn
    captured = {}
    old = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.setdefault("attn", out))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        handle.remove()
        attn.fused_attn = old
    return captured["attn"]  # (B, heads, N, N)


@pytest.mark.parametrize("select_layer", [-2, -1])
def test_fastervlm_rule_matches_materialised_attention(select_layer):
    """FasterVLM: [CLS]->patch attention of the selected block (its attentions[select_layer]), heads averaged,
    top-k kept in original order, taken from that block's output."""
    name = "test_vit"
    full = tower_for(name)
    model = full.vision_tower
    x = images(name, seed=2)
    keep = 5
    reduced = tower_for(name, keep_tokens=keep, select_layer=select_layer)
    reduced.vision_tower.load_state_dict(model.state_dict())
    out = reduced(x)

    block = len(model.blocks) + select_layer
    attn = naive_cls_attention(model, x, block)
    p = model.num_prefix_tokens
    scores = attn[:, :, 0, p:].mean(dim=1)  # CLS query -> patch keys, heads averaged
    selected = hooked_layer_output(model, x, "blocks.%d" % block)[:, p:]
    for b in range(x.shape[0]):
        order = sorted(scores[b].topk(keep).indices.tolist())
        torch.testing.assert_close(out[b], selected[b, order], rtol=1e-4, atol=1e-5)
    if select_layer != -2:
        return
    # ratio form and cls_patch: class token first, then the same kept patches
    by_ratio = tower_for(name, keep_ratio=keep / full.num_patches, select_feature="cls_patch")
    by_ratio.vision_tower.load_state_dict(model.state_dict())
    out2 = by_ratio(x)
    assert out2.shape[1] == keep + 1
    torch.testing.assert_close(out2[:, 1:], out, rtol=1e-5, atol=1e-6)


def test_pool_rule_is_grid_average():
    name = "test_vit"
    full = tower_for(name)
    pooled = tower_for(name, keep_tokens=4, reduction="pool")
    pooled.vision_tower.load_state_dict(full.vision_tower.state_dict())
    x = images(name, seed=3)
    tokens = full(x)  # (B, 16, C) on a 4x4 grid
    h = w = full.num_patches_per_side
    grid = tokens.reshape(2, h, w, -1)
    expected = torch.stack([grid[:, i:i + 2, j:j + 2].mean(dim=(1, 2)) for i in (0, 2) for j in (0, 2)], dim=1)
    torch.testing.assert_close(pooled(x), expected, rtol=1e-5, atol=1e-6)


def test_list_of_images_matches_batch():
    skimage_data = pytest.importorskip("skimage.data")
    tower = tower_for("test_vit")
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.camera()]  # square, wide, gray
    batch = tower.image_processor(photos)["pixel_values"]
    out = tower(batch)
    listed = tower(photos)  # raw images go through the tower's processor
    assert isinstance(listed, list) and len(listed) == 3
    for i, item in enumerate(listed):
        assert item.shape == (1, tower.num_patches, tower.hidden_size)
        torch.testing.assert_close(item[0], out[i], rtol=1e-5, atol=1e-6)
    tensors = tower(list(batch))  # a list of (3, H, W) tensors, as LLaVA passes
    torch.testing.assert_close(torch.cat(tensors), out, rtol=1e-5, atol=1e-6)


def test_frozen_by_default_and_trainable_on_request():
    frozen = ZooVisionTower("test_convnext", image_size=64)
    frozen.train()
    assert not frozen.vision_tower.training  # a frozen tower keeps BatchNorm/dropout in eval
    assert not any(p.requires_grad for p in frozen.parameters())
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    assert not frozen(x).requires_grad

    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch", unfreeze_mm_vision_tower=True,
                           image_size=64)
    trainable = ZooVisionTower("test_convnext", args)
    assert trainable.vision_tower.training
    out = trainable(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    stem = trainable.vision_tower.stem[0].weight
    assert stem.requires_grad and stem.grad is not None and stem.grad.abs().sum() > 0


def test_delay_load_knows_shapes_without_weights():
    lazy = ZooVisionTower("test_vit", SimpleNamespace(mm_vision_select_layer=-2, image_size=96, keep_tokens=7),
                          delay_load=True)
    assert not lazy.is_loaded and lazy.device.type == "meta"
    assert lazy.image_processor.image_size == 96  # preprocessing is known before the weights
    with pytest.raises(RuntimeError, match="load_model"):
        lazy(torch.randn(1, 3, 96, 96))
    hidden, patches = lazy.hidden_size, lazy.num_patches
    lazy.load_model()
    assert lazy.is_loaded and lazy.device.type == "cpu"
    assert lazy(torch.randn(1, 3, 96, 96)).shape == (1, patches, hidden) == (1, 7, 64)
    assert lazy.dummy_feature.shape == (1, hidden)
    assert lazy.config.image_size == 96 and lazy.config.patch_size == 16


@pytest.mark.parametrize("name,size,tokens,width", [
    ("convllava_large", 1536, 576, 3072),  # ConvLLaVA's headline: 1536 px -> 576 tokens
    ("convllava_large", 768, 144, 3072),
    ("vit_large_patch14_clip_336", 336, 576, 1024),  # CLIP ViT-L/14-336, LLaVA-1.5's tower
    ("vim_small_patch16_224", 448, 784, 384),  # pos-embed resized to the 28x28 grid
])
def test_high_resolution_token_counts_full_size_configs(name, size, tokens, width):
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered (its family has not landed)")
    tower = ZooVisionTower(name, image_size=size, delay_load=True)  # meta build: no weights, no memory
    assert (tower.num_patches, tower.hidden_size) == (tokens, width)


def test_high_resolution_is_a_parameter_for_token_and_hierarchical_models():
    for name in ("test_vit", "test_convllava"):
        if not timm.is_model(name):
            continue
        low, high = ZooVisionTower(name, image_size=64), ZooVisionTower(name, image_size=128)
        out = high(torch.randn(1, 3, 128, 128))
        assert out.shape[1] == high.num_patches == 4 * low.num_patches


def test_clear_errors():
    with pytest.raises(ValueError, match="select feature"):
        ZooVisionTower("test_vit", image_size=64, select_feature="cls")
    with pytest.raises(ValueError, match="out of range"):
        ZooVisionTower("test_vit", image_size=64, select_layer=-50)
    with pytest.raises(ValueError, match="embedding output"):
        ZooVisionTower("test_vit", image_size=64, select_layer=0)
    with pytest.raises(ValueError, match="exceeds"):
        ZooVisionTower("test_vit", image_size=64, keep_tokens=17)
    with pytest.raises(ValueError, match="either keep_tokens or keep_ratio"):
        ZooVisionTower("test_vit", image_size=64, keep_tokens=2, keep_ratio=0.5)
    with pytest.raises(ValueError, match="unknown reduction"):
        ZooVisionTower("test_vit", image_size=64, keep_tokens=2, reduction="random")
    with pytest.raises(ValueError, match="class token"):
        ZooVisionTower("test_convnext", image_size=64, keep_tokens=2, reduction="cls_attention")
    with pytest.raises(TypeError, match="unknown ZooVisionTower option"):
        ZooVisionTower("test_vit", image_size=64, keep=3)
    tower = tower_for("test_vit")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tower.encoder(torch.randn(3, 64, 64))


@pytest.mark.parametrize("name", ["test_vit", "test_vim"])
def test_checkpoint_at_low_resolution_loads_at_high_resolution(name, tmp_path):
    """A local checkpoint saved at 64 px loads into a 128 px tower: position embedding resized by the family's
    checkpoint filter, every other weight unchanged, 4x the tokens."""
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered (its family has not landed)")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    low = timm.create_model(name, img_size=64, num_classes=0)
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in low.state_dict().items()}, str(path))
    tower = ZooVisionTower(name, image_size=128, checkpoint_path=str(path))
    loaded, saved = tower.vision_tower.state_dict(), low.state_dict()
    resized = [k for k in saved if loaded[k].shape != saved[k].shape]
    assert resized == ["pos_embed"]
    for k in saved:
        if k not in resized:
            assert torch.equal(loaded[k], saved[k]), k
    stride = low.feature_info[-1]["reduction"]
    side_low, side_high = 64 // stride, 128 // stride
    grid_tokens = loaded["pos_embed"].shape[1] - (saved["pos_embed"].shape[1] - side_low ** 2)
    assert grid_tokens == side_high ** 2
    assert tower(torch.randn(1, 3, 128, 128)).shape == (1, side_high ** 2, tower.hidden_size)


def test_low_precision_tower_returns_input_dtype():
    tower = ZooVisionTower("test_vit", image_size=64)
    reference = tower(images("test_vit"))
    tower.to(torch.bfloat16)
    assert tower.dtype == torch.bfloat16
    out = tower(images("test_vit"))  # float32 in, computed in bfloat16, float32 out (as LLaVA's tower)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.1)


def test_convllava_1536px_gives_576_tokens_end_to_end():
    """ConvLLaVA's high-resolution setting on a real forward (test-sized widths, real 5-stage layout)."""
    if not timm.is_model("test_convllava"):
        pytest.skip("test_convllava is not registered (its family has not landed)")
    tower = ZooVisionTower("test_convllava", image_size=1536)
    x = torch.randn(1, 3, 1536, 1536)
    out = tower(x)
    assert out.shape == (1, 576, tower.hidden_size) and tower.config.grid == (24, 24)
    last_stage = hooked_layer_output(tower.vision_tower, x, tower.vision_tower.feature_info[-1]["module"])
    torch.testing.assert_close(out, last_stage.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)


# --- options that cannot apply (issue 15 item 9): clear errors, or it works -----------------------------------

def test_select_layer_is_for_token_models_and_select_stage_for_hierarchical_ones():
    with pytest.raises(ValueError, match=r"select_layer=99 applies to token models.*select_stage in 0\.\.\d"):
        ZooVisionTower("test_convnext", image_size=64, select_layer=99)  # was silently ignored
    with pytest.raises(ValueError, match=r"select_stage=3 applies to hierarchical models.*select_layer in 1\.\.6"):
        ZooVisionTower("test_vit", image_size=64, select_stage=3)  # was silently ignored
    # LLaVA always passes mm_vision_select_layer (-2 by default): that default stays accepted everywhere
    llava_args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_size=64)
    assert ZooVisionTower("test_convnext", llava_args).encoder.position == 3  # the last stage


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_image_size_zero_or_below_one_patch_is_refused(name):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        ZooVisionTower(name, image_size=0)  # hierarchical models took 0 as "the default"
    stride = timm.create_model(name, num_classes=0).feature_info[-1]["reduction"]
    with pytest.raises(ValueError, match=f"too small for one patch token.*smallest accepted size is {stride}"):
        ZooVisionTower(name, image_size=stride - 1)  # built a tower with 0 patches
    assert ZooVisionTower(name, image_size=stride).num_patches == 1


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_keep_tokens_with_an_input_smaller_than_image_size_is_a_clear_error(name):
    tower = ZooVisionTower(name, image_size=128, keep_tokens=10)
    with pytest.raises(ValueError, match=r"keep_tokens=10 but a 32x32 input gives only \d+ patch tokens.*128x128"):
        tower(torch.randn(1, 3, 32, 32))  # hierarchical towers ended in "selected index k out of range"


@pytest.mark.parametrize("name", tiny_models())
def test_batch_of_zero_images_gives_empty_features(name):
    tower = tower_for(name, select_feature="cls_patch")
    one = tower(images(name, batch=1))
    empty = tower(images(name, batch=0))  # Vim and ViT failed in a reshape
    assert empty.shape == (0,) + one.shape[1:] and empty.dtype == one.dtype


def test_vim_odd_patch_grid_class_token_and_patches_match_block_output():
    """A 7x7 grid (49 patches, odd): the middle class token sits at index 49 // 2 = 24 (official Vim); with an
    even grid (M+1)//2 and M//2 agree, so only an odd grid tells them apart."""
    if not timm.is_model("test_vim"):
        pytest.skip("test_vim is not registered (its family has not landed)")
    stride = timm.create_model("test_vim", num_classes=0).feature_info[-1]["reduction"]
    tower = ZooVisionTower("test_vim", image_size=7 * stride, select_feature="cls_patch", select_layer=-1)
    assert tower.config.grid == (7, 7)
    x = torch.randn(2, 3, 7 * stride, 7 * stride, generator=torch.Generator().manual_seed(4))
    out = tower(x)
    ref_prefix, ref_patches = reference_tokens(tower, x, tower.encoder.position)
    torch.testing.assert_close(out[:, 0:1], ref_prefix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], ref_patches, rtol=1e-4, atol=1e-5)


def perturb_(model, seed=0, scale=0.2):
    """Moves every weight off its init (qkv biases included, zero at init) so bias and slicing bugs show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for block in model.blocks:
            block.attn.qkv.bias.copy_(torch.randn(block.attn.qkv.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("select_layer", [-2, -1])
def test_fastervlm_scores_match_materialised_attention_with_biases(select_layer, qk_norm):
    """Score level, not only the top-k: the [CLS] row of the selected block's softmax (fused SDPA switched off,
    weights captured), heads averaged, against the encoder's recomputed scores, on perturbed weights with
    non-zero q/k/v biases (a key bias taken from the query slice changes every score)."""
    torch.manual_seed(0)
    tower = ZooVisionTower("test_vit", image_size=64, keep_tokens=5, select_layer=select_layer,
                           model_args=dict(qk_norm=qk_norm))
    model = perturb_(tower.vision_tower, seed=3)
    x = images("test_vit", seed=5)
    (feats,), scores = tower.encoder.forward_layers(x, [tower.encoder.position])
    block = len(model.blocks) + select_layer
    attn = naive_cls_attention(model, x, block)
    p = model.num_prefix_tokens
    expected = attn[:, :, 0, p:].mean(dim=1)
    assert expected.std(dim=1).min() > 1e-3  # the scores are not flat: a wrong one cannot hide
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    selected = hooked_layer_output(model, x, "blocks.%d" % block)[:, p:]
    out = tower(x)
    for b in range(x.shape[0]):
        order = sorted(expected[b].topk(5).indices.tolist())
        torch.testing.assert_close(out[b], selected[b, order], rtol=1e-4, atol=1e-5)
