"""MambaVision and FastViTHD: official parity fixtures, manifests, checkpoints, the timm interface, VLM towers."""
from __future__ import annotations

import argparse
import importlib

import pytest
import timm
import torch
import torch.nn.functional as F

from _parity import (assert_matches_official, fixture_id, load_fixture, load_manifest_on_meta, parity_dir,
                     parity_files)
import zoo
from zoo.models.mambavision import (
    MambaVisionMixer,
    attention_block_indices,
    checkpoint_filter_fn,
    from_official_kwargs,
    official_kwargs_to_model_args,
    window_partition,
    window_reverse,
)
from zoo.ops import selective_scan_naive
from zoo.vlm import ZooVisionTower

PARITY_DIR = parity_dir("mambavision")
FIXTURES = parity_files("mambavision", "mambavision_*.json")
MANIFESTS = parity_files("mambavision", "manifest_*.json")
NO_FIXTURES = f"official parity fixtures not found in {PARITY_DIR}"
OFFICIAL_TO_ZOO = {"mamba_vision_T": "mambavision_tiny", "mamba_vision_T2": "mambavision_tiny2",
                   "mamba_vision_S": "mambavision_small", "mamba_vision_B": "mambavision_base",
                   "mamba_vision_L": "mambavision_large", "mamba_vision_L2": "mambavision_large2"}


# --- official parity --------------------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
@pytest.mark.parametrize("scan_backend", ["reference", "auto"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_official_parity(fixture, scan_backend, monkeypatch):
    monkeypatch.setenv("ZOO_SCAN_BACKEND", scan_backend)
    if scan_backend == "auto" and zoo.ops.resolve_backend("cpu").name == "reference":
        pytest.skip("no faster scan backend on this machine: 'auto' is the reference run")
    meta, tensors, official_sd = load_fixture(fixture)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model = from_official_kwargs(**meta["official_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_sd, model), strict=True)
    assert_matches_official(model, meta, tensors)
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input"]), tensors["logits"], rtol=meta["rtol"], atol=meta["atol"])
    assert zoo.ops.last_backend().name == zoo.ops.resolve_backend("cpu").name


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_fixture_window_plans_match_the_model():
    """The padded and unpadded fixtures exercise what they say: our stages pad exactly where the official did."""
    for fixture in FIXTURES:
        meta, tensors, _ = load_fixture(fixture)
        model = from_official_kwargs(**meta["official_kwargs"])
        for plan in meta["diagnostics"]["window_plan"]:
            stage = model.stages[plan["level"]]
            window = stage.window_size
            padded = [-(-s // window) * window for s in plan["map"]]
            assert window == plan["window"] and padded == plan["padded"]
            assert (padded != plan["map"]) == plan["padding"]
            kinds = [i for i, b in enumerate(stage.blocks) if not isinstance(b.mixer, MambaVisionMixer)]
            assert kinds == plan["attention_blocks"]


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_released_style_checkpoint_loads_through_timm(tmp_path):
    """A released-style .pth.tar (timm training checkpoint: weights under 'state_dict' next to pickled
    argparse args) through timm's pretrained file path, and the other wrappings the official loader accepts."""
    fixture = next(f for f in FIXTURES if "pad" in f.stem)
    meta, tensors, official_sd = load_fixture(fixture)
    path = tmp_path / "mambavision_tiny_1k.pth.tar"
    torch.save({"state_dict": official_sd, "args": argparse.Namespace(model="mamba_vision_T"), "epoch": 309}, path)
    args = official_kwargs_to_model_args(**meta["official_kwargs"])
    model = timm.create_model("mambavision_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **args).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input"]), tensors["logits"], rtol=meta["rtol"], atol=meta["atol"])

    expected = checkpoint_filter_fn(official_sd)
    for wrapped in ({"model": official_sd}, {f"module.{k}": v for k, v in official_sd.items()},
                    {**{f"encoder.{k}": v for k, v in official_sd.items()}, "head_extra": torch.zeros(1)}):
        mapped = checkpoint_filter_fn(wrapped)  # with encoder.*, only those keys are kept (official loader)
        assert mapped.keys() == expected.keys()
        assert all(torch.equal(mapped[k], expected[k]) for k in expected)
    assert checkpoint_filter_fn(model.state_dict()).keys() == model.state_dict().keys()  # zoo layout passes

    other_head = timm.create_model("mambavision_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                   **dict(args, num_classes=3))
    assert other_head.get_classifier().out_features == 3
    assert torch.equal(other_head.stages[3].blocks[0].mixer.A_log, official_sd["levels.3.blocks.0.mixer.A_log"])


@pytest.mark.skipif(not MANIFESTS, reason=NO_FIXTURES)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=fixture_id)
def test_manifest_loads_strictly(manifest):
    model, meta = load_manifest_on_meta(manifest, OFFICIAL_TO_ZOO, checkpoint_filter_fn)
    assert model.pretrained_cfg["url"] == meta["checkpoint_url"]
    assert model.pretrained_cfg["crop_pct"] == meta["pretrained_cfg"]["crop_pct"]
    attention = [[i for i, b in enumerate(s.blocks) if not isinstance(getattr(b, "mixer", None), MambaVisionMixer)]
                 if not s.conv else None for s in model.stages]
    assert attention == meta["attention_blocks_per_level"]
    # the recorded official constructor kwargs build the same architecture
    args = official_kwargs_to_model_args(**meta["constructor_kwargs_full_signature"])
    with torch.device("meta"):
        again = timm.create_model(OFFICIAL_TO_ZOO[meta["official_model_name"]], **args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# --- the mixer and windows against explicit constructions ---------------------------------------------


def test_mixer_matches_explicit_construction():
    torch.manual_seed(0)
    mixer = MambaVisionMixer(dim=12, d_state=4).double()
    with torch.no_grad():  # make the recurrence and the dt bias matter
        mixer.x_proj.weight.mul_(4.0)
        mixer.dt_proj.bias.uniform_(-1.0, 0.5)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(x)
        half = mixer.d_half
        xz = x @ mixer.in_proj.weight.T
        xs, z = xz[..., :half].transpose(1, 2), xz[..., half:].transpose(1, 2)
        xs = F.silu(F.conv1d(F.pad(xs, (1, 1)), mixer.conv1d_x.weight, groups=half))  # symmetric: non-causal
        z = F.silu(F.conv1d(F.pad(z, (1, 1)), mixer.conv1d_z.weight, groups=half))
        dt, Bm, Cm = (xs.transpose(1, 2) @ mixer.x_proj.weight.T).split([mixer.dt_rank, 4, 4], dim=-1)
        bias = mixer.dt_proj.bias
        delta = (dt @ mixer.dt_proj.weight.T + 2 * bias).transpose(1, 2)  # the bias counts twice, as officially
        y = selective_scan_naive(xs, delta, -mixer.A_log.exp(), Bm.transpose(1, 2)[:, None],
                                 Cm.transpose(1, 2)[:, None], mixer.D, delta_softplus=True)
        expected = torch.cat([y, z], dim=1).transpose(1, 2) @ mixer.out_proj.weight.T  # concatenated, no gate
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_windows_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    windows = window_partition(x, 2)
    assert windows.shape == (2 * 2 * 3, 4, 3)
    # window 1 of image 0 is rows 0-1, columns 2-3, tokens row-major
    assert windows[1, :, 0].tolist() == [x[0, 0, 0, 2], x[0, 0, 0, 3], x[0, 0, 1, 2], x[0, 0, 1, 3]]
    assert torch.equal(window_reverse(windows, 2, 4, 6), x)


@pytest.mark.parametrize("depth,expected", [(1, ()), (2, (1,)), (3, (2,)), (4, (2, 3)), (8, (4, 5, 6, 7)),
                                            (11, (6, 7, 8, 9, 10))])
def test_attention_block_indices(depth, expected):
    assert attention_block_indices(depth) == expected


def test_padding_bottom_right_and_not_masked():
    """A hybrid stage zero-pads at the bottom/right, runs the padding tokens through every block unmasked
    (they reach real tokens through attention and the scan), then crops."""
    torch.manual_seed(0)
    stage = timm.create_model("test_mambavision").stages[2].eval()  # window 3: a Mamba and an attention block
    stage.downsample = torch.nn.Identity()
    x = torch.randn(2, 64, 4, 5)
    with torch.no_grad():
        out = stage(x)
        padded = torch.zeros(2, 64, 6, 6)
        padded[:, :, :4, :5] = x
        expected = window_reverse(stage.blocks(window_partition(padded, 3)), 3, 6, 6)[:, :, :4, :5]
        top_left = torch.zeros(2, 64, 6, 6)
        top_left[:, :, 2:, 1:] = x
        elsewhere = window_reverse(stage.blocks(window_partition(top_left, 3)), 3, 6, 6)[:, :, 2:, 1:]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (elsewhere - out).abs().max() > 1e-3  # where the zeros sit changes the real tokens: not masked


# --- the timm interface on the test-sized variant ------------------------------------------------------


def test_forward_any_size_and_head():
    model = timm.create_model("test_mambavision", num_classes=5)
    x = torch.randn(2, 3, 50, 70)  # stage maps 13x18, 7x9, 4x5 (padded to 6x6), 2x3 (padded to 2x4)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "some parameter got no gradient"
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [tuple(t.shape[1:]) for t in inter] == [(16, 13, 18), (32, 7, 9), (64, 4, 5), (128, 2, 3)]
        nhwc = model.forward_intermediates(x, indices=1, intermediates_only=True, norm=True, output_fmt="NHWC")
        torch.testing.assert_close(nhwc[0], feats.permute(0, 2, 3, 1))
    assert {"stages.2.blocks.0.mixer.A_log", "stages.3.blocks.0.mixer.D"} <= model.no_weight_decay()


def test_features_only_strides():
    model = timm.create_model("test_mambavision", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 64, 4, 6), (1, 128, 2, 3)]
    sub = timm.create_model("test_mambavision", features_only=True, out_indices=(1, 2))
    assert sub.feature_info.reduction() == [8, 16] and len(sub.model.stages) == 3


def test_clear_errors():
    model = timm.create_model("test_mambavision")
    for shape in [(1, 4, 32, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\)"):
            model(torch.randn(shape))
        with pytest.raises(ValueError, match="expected an image batch"):
            model.forward_intermediates(torch.randn(shape))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")
    with pytest.raises(ValueError, match=r"3 window_size for 4 stages"):
        timm.create_model("test_mambavision", window_size=(8, 8, 3))
    official = dict(dim=8, in_dim=8, depths=[1, 1, 2, 2], window_size=[4, 4, 2, 1], mlp_ratio=4,
                    num_heads=[1, 2, 2, 4])
    with pytest.raises(ValueError, match=r"layer_scale='x'.*unknown kwargs \['bogus'\]"):
        from_official_kwargs(**official, layer_scale="x", bogus=1)
    with pytest.raises(ValueError, match=r"missing required kwargs \['in_dim'\]"):
        from_official_kwargs(**{k: v for k, v in official.items() if k != "in_dim"})
    # swallowed by the official class (timm adds img_size): accepted, no effect
    assert isinstance(from_official_kwargs(**official, resolution=224, img_size=[224, 224]), torch.nn.Module)
    with pytest.raises(RuntimeError, match=r"no downloadable pretrained weights.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model("test_mambavision", pretrained=True)


def test_qk_norm_and_layer_scale_keys_map():
    official = dict(dim=8, in_dim=8, depths=[1, 1, 2, 2], window_size=[4, 4, 2, 1], mlp_ratio=4,
                    num_heads=[1, 2, 2, 4], qk_scale=True, layer_scale=1e-5, layer_scale_conv=0.1)
    model = from_official_kwargs(**official)
    keys = set(model.state_dict())
    assert {"stages.2.blocks.1.mixer.q_norm.weight", "stages.0.blocks.0.ls.gamma", "stages.3.blocks.0.ls1.gamma",
            "stages.3.blocks.0.ls2.gamma"} <= keys
    official_keys = {"levels.0.blocks.0.gamma": "stages.0.blocks.0.ls.gamma",
                     "levels.3.blocks.0.gamma_1": "stages.3.blocks.0.ls1.gamma",
                     "levels.2.downsample.reduction.0.weight": "stages.3.downsample.weight",
                     "patch_embed.conv_down.4.running_var": "stem.4.running_var", "head.bias": "head.fc.bias"}
    mapped = checkpoint_filter_fn({k: torch.zeros(1) for k in official_keys})
    assert sorted(mapped) == sorted(official_keys.values()) and all(v in keys for v in official_keys.values())


def test_uses_zoo_ops_scan(monkeypatch):
    scan_module = importlib.import_module("zoo.ops.selective_scan")
    monkeypatch.delenv("ZOO_SCAN_BACKEND", raising=False)
    seen = []
    reference = scan_module._BACKENDS["reference"]

    def counting_scan(u, *args, **kwargs):
        seen.append(tuple(u.shape))
        return reference.scan(u, *args, **kwargs)

    monkeypatch.setitem(scan_module._BACKENDS, "counting",
                        scan_module._Backend("counting", lambda d: (True, "test"), counting_scan, priority=100))
    model = timm.create_model("test_mambavision").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # stage 2: 4x4 map padded to 6x6 -> 4 windows of 9 tokens, 32 SSM channels; stage 3: 2x2 -> 1 window of 4
    assert seen == [(4, 32, 9), (1, 64, 4)]


# --- FastViTHD and the VLM towers ----------------------------------------------------------------------


def test_fastvithd_is_timms_fastvit_mci3_with_the_final_conv_level():
    with torch.device("meta"):
        ours, timms = timm.create_model("fastvithd"), timm.create_model("fastvit_mci3")
    assert type(ours).__mro__[1] is type(timms)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in timms.state_dict().items()}
    assert ours.feature_info[:-1] == timms.feature_info
    assert ours.feature_info[-1] == dict(num_chs=3072, reduction=64, module="final_conv")
    assert ours.pretrained_cfg["hf_hub_id"] == timms.pretrained_cfg["hf_hub_id"]
    info = zoo.model_info("fastvithd")
    assert info.feature_channels[-1] == 3072 and info.max_reduction == 64 and info.family == "fastvit"
    assert {"fastvit_mci3", "fastvit_mci4", "fastvithd", "test_fastvithd"} <= set(zoo.list_models("fastvit"))
    assert {"mambavision", "fastvit"} <= set(zoo.list_families())
    assert "mambavision_large2" in zoo.list_models("mambavision")


def test_fastvithd_final_level_is_the_final_conv_output():
    model = timm.create_model("test_fastvithd").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        last = model.forward_intermediates(x, indices=[5], intermediates_only=True)[0]
        torch.testing.assert_close(last, model.forward_features(x))
        stage4 = model.forward_intermediates(x, indices=[4], intermediates_only=True, stop_early=True)[0]
        torch.testing.assert_close(model.final_conv(stage4), last)
    pruned = timm.create_model("test_fastvithd")
    pruned.prune_intermediate_layers(indices=[4])
    assert isinstance(pruned.final_conv, torch.nn.Identity) and len(pruned.feature_info) == 5


@pytest.mark.parametrize("name,size,tokens,width", [
    ("fastvithd", 1024, 256, 3072),  # FastVLM's tower: 1024 px -> 16 x 16 tokens of the final conv
    ("fastvit_mci3", 1024, 256, 1536),  # timm's model as is: its last stage
    ("mambavision_tiny", 448, 196, 640),
])
def test_tower_token_counts_full_size(name, size, tokens, width):
    tower = ZooVisionTower(name, image_size=size, delay_load=True)  # meta build: no weights, no memory
    assert (tower.num_patches, tower.hidden_size) == (tokens, width)


@pytest.mark.parametrize("name,size,grid,width", [("test_mambavision", 96, (3, 3), 128),
                                                  ("test_fastvithd", 256, (4, 4), 256)])
def test_tower_tiny_end_to_end(name, size, grid, width):
    tower = ZooVisionTower(name, image_size=size)
    x = torch.randn(1, 3, size, size)
    out = tower(x)
    assert out.shape == (1, grid[0] * grid[1], width) and tower.config.grid == grid
    with torch.no_grad():
        expected = tower.vision_tower.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2))
