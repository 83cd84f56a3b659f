"""ConvLLaVA 5-stage ConvNeXt encoder: official parity, checkpoint layout, param count and token grids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from _parity import load_fixture, parity_dir, parity_files
import zoo  # noqa: F401  (registers the models)
from zoo.models.convllava import ConvLLaVAConvNeXt, checkpoint_filter_fn, from_official_kwargs, token_grid

PARITY_DIR = parity_dir("convllava")
MANIFEST = PARITY_DIR / "manifest_convllava_convnext_large_5stage.json"
# every token fixture in the folder (a held-out one dropped in later is picked up), not the manifests
FIXTURES = parity_files(
    "convllava", "*.json", keep=lambda p: not p.name.startswith("manifest_") and p.with_suffix(".safetensors").exists()
)
needs_parity = pytest.mark.skipif(not PARITY_DIR.is_dir(), reason=f"parity fixtures not found at {PARITY_DIR}")


def _load_fixture(sidecar: Path):
    meta, tensors, state_dict = load_fixture(sidecar)
    return meta, tensors["input"], state_dict, tensors["tokens"]


@needs_parity
@pytest.mark.parametrize("sidecar", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_official_parity_tokens(sidecar):
    """Every fixture in the folder (including held-out ones) reproduces the official tower's tokens."""
    meta, x, state_dict, expected = _load_fixture(sidecar)
    model = from_official_kwargs(**meta["official_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        fmap = model.forward_features(x)
    grid = token_grid(*x.shape[-2:], patch_size=model.stem[0].stride[0])
    assert tuple(fmap.shape[-2:]) == grid == tuple(meta.get("token_grid", grid))
    assert tokens.shape == expected.shape == (x.shape[0], grid[0] * grid[1], fmap.shape[1])
    torch.testing.assert_close(tokens, expected, atol=meta["atol"], rtol=meta["rtol"])
    # row-major flattening of the NCHW map, no final norm
    torch.testing.assert_close(tokens, fmap.permute(0, 2, 3, 1).reshape(tokens.shape), atol=0, rtol=0)


@needs_parity
def test_parity_is_sensitive_to_the_fifth_stage():
    """A model that ignored the appended stage's weights could not pass: perturbing them moves the tokens."""
    meta, x, state_dict, expected = _load_fixture(FIXTURES[0])
    model = from_official_kwargs(**meta["official_kwargs"]).eval()
    mapped = checkpoint_filter_fn(state_dict, model)
    mapped["stages.4.blocks.0.gamma"] = mapped["stages.4.blocks.0.gamma"] * 2
    model.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        assert not torch.allclose(model.forward_tokens(x), expected, atol=meta["atol"], rtol=meta["rtol"])


@needs_parity
def test_registered_test_variant_is_the_fixture_architecture():
    meta, x, state_dict, expected = _load_fixture(FIXTURES[0])
    if tuple(meta["official_kwargs"]["hidden_sizes"]) != (16, 24, 32, 48):
        pytest.skip("first fixture is not the test_convllava configuration")
    model = timm.create_model("test_convllava").eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens(x), expected, atol=meta["atol"], rtol=meta["rtol"])


@needs_parity
def test_release_manifest_loads_strictly_and_param_count():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = timm.create_model("convllava_large")
        official = {k: torch.empty(shape) for k, shape in manifest["keys"].items()}
    mapped = checkpoint_filter_fn(official, model)
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    for key, tensor in mapped.items():
        assert tuple(tensor.shape) == tuple(expected[key].shape), key
    model.load_state_dict(mapped, strict=True, assign=True)
    # the official count includes ConvNextModel's final layernorm (sized for stage 4, never applied to
    # the tokens), which the encoder drops
    dead_norm = sum(torch.Size(shape).numel() for k, shape in manifest["keys"].items() if k.startswith("layernorm."))
    assert dead_norm == 2 * 1536
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] - dead_norm
    assert zoo.registry.model_info("convllava_large").num_params == manifest["num_params"] - dead_norm
    assert tuple(manifest["tokens_at_1536"]) == (1, 576, 3072)


def test_released_config_tokens_at_1536_and_768_on_meta():
    with torch.device("meta"):
        model = timm.create_model("convllava_large")
        tokens_1536 = model.forward_tokens(torch.empty(1, 3, 1536, 1536))
        tokens_768 = model.forward_tokens(torch.empty(1, 3, 768, 768))
        wide = model.forward_features(torch.empty(1, 3, 1024, 1536))
    assert tuple(tokens_1536.shape) == (1, 576, 3072)
    assert tuple(tokens_768.shape) == (1, 144, 3072)
    assert tuple(wide.shape) == (1, 3072, 16, 24)
    assert 660e6 < sum(p.numel() for p in model.parameters()) < 680e6


@pytest.mark.parametrize("size, grid", [
    ((1536, 1536), (24, 24)),   # 576 tokens
    ((768, 1152), (12, 18)),    # non-square
    ((700, 1000), (10, 15)),    # not a multiple of 64: every stride-2 step floors
])
def test_token_grid_real_forward_small_width(size, grid):
    """Same strides as the released model at small width, on real tensors."""
    model = timm.create_model("test_convllava").eval()
    with torch.no_grad():
        tokens = model.forward_tokens(torch.randn(1, 3, *size))
    assert token_grid(*size) == grid
    assert tokens.shape == (1, grid[0] * grid[1], model.num_features)


def test_checkpoint_filter_accepts_full_llava_checkpoint_and_drops_dead_norm():
    model = timm.create_model("test_convllava")
    tower = {}
    for key, value in model.state_dict().items():
        tower[key] = value.clone()
    # round trip through the official layout built by hand from the documented rules
    official = {}
    for key, value in tower.items():
        k = key.replace("stem.0.", "embeddings.patch_embeddings.").replace("stem.1.", "embeddings.layernorm.")
        k = k.replace("stages.", "encoder.stages.").replace(".downsample.", ".downsampling_layer.")
        k = k.replace(".blocks.", ".layers.").replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.")
        k = k.replace(".mlp.fc2.", ".pwconv2.").replace(".gamma", ".layer_scale_parameter")
        k = k.replace(".norm.", ".layernorm.")
        official["model.vision_tower.vision_tower." + k] = value
    official["model.vision_tower.vision_tower.layernorm.weight"] = torch.ones(48)
    official["model.vision_tower.vision_tower.layernorm.bias"] = torch.zeros(48)
    official["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)  # language model key: ignored
    mapped = checkpoint_filter_fn(official, model)
    assert set(mapped) == set(tower)
    for key in tower:
        assert torch.equal(mapped[key], tower[key]), key
    # a training checkpoint: weights under 'state_dict' next to non-tensor entries
    wrapped = checkpoint_filter_fn({"state_dict": {**official, "global_step": 5}, "epoch": 1}, model)
    assert set(wrapped) == set(tower)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="depths and dims"):
        ConvLLaVAConvNeXt(depths=(1, 1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="unsupported official kwargs"):
        from_official_kwargs(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], vision_tower="x")
    with pytest.raises(ValueError, match="mm_vision_select_layer"):
        from_official_kwargs(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], vision_add_five_stage=1,
                             vision_five_stage_width=8, mm_vision_select_layer=-2)
    with pytest.raises(ValueError, match="ConvLLaVA vision-tower"):
        checkpoint_filter_fn({"foo.weight": torch.zeros(1)}, timm.create_model("test_convllava"))
    model = timm.create_model("test_convllava")
    with pytest.raises(ValueError, match="at least 64"):
        model.forward_features(torch.randn(1, 3, 32, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.forward_features(torch.randn(1, 1, 64, 64))


def test_drop_path_spans_all_five_stages():
    model = timm.create_model("test_convllava", drop_path_rate=0.2)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.stages for block in stage.blocks]
    assert len(rates) == 6
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)


def test_official_kwargs_without_fifth_stage_is_a_stride_32_trunk():
    model = from_official_kwargs(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], vision_add_five_stage=0).eval()
    assert len(model.stages) == 4 and model.feature_info[-1]["reduction"] == 32
    with torch.no_grad():
        tokens = model.forward_tokens(torch.randn(1, 3, 96, 160))
    assert token_grid(96, 160, num_stages=4) == (3, 5)
    assert tokens.shape == (1, 15, 16)


def test_appended_stage_gets_the_trunk_initialisation():
    """The official tower initialises every stage, the appended one included, as ConvNeXt does:
    conv / linear weights ~ N(0, 0.02) with zero biases, LayerNorms at (1, 0), layer scale at
    ls_init_value. PyTorch's default init (what a stage left uninitialised keeps) has biases != 0 and
    weight std 1/sqrt(3 fan_in), e.g. 0.08 for a 7x7 depthwise conv."""
    torch.manual_seed(0)
    model = timm.create_model("test_convllava", dims=(16, 24, 32, 48, 256), depths=(1, 1, 1, 1, 2))
    extra = model.stages[4]
    weights = [m for m in extra.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weights) >= 7  # downsample conv, and per block: depthwise conv, fc1, fc2
    for m in weights:
        assert m.bias is None or bool((m.bias == 0).all()), m
        std = m.weight.std().item()
        assert 0.016 < std < 0.024, (m, std)
    norms = [m for m in extra.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(bool((n.weight == 1).all() and (n.bias == 0).all()) for n in norms)
    for block in extra.blocks:
        torch.testing.assert_close(block.gamma, torch.full_like(block.gamma, 1e-6))
