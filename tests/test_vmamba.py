"""VMamba: official parity fixtures, manifests, checkpoint layouts, the mixer against an explicit
construction, and the timm / VLM interfaces on the test-sized variant."""
from __future__ import annotations

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F

from _parity import (assert_matches_official, check_official_style_file, fixture_id, load_fixture,
                     load_manifest_on_meta, older_vmamba_codebase_names, parity_dir, parity_files)
import zoo  # noqa: F401  (registers the models)
from zoo.layers.ssm import cross_merge_2d, cross_scan_2d
from zoo.ops import scan_order_index, selective_scan_naive
from zoo.models.vmamba import SCAN_MODES, SS2D, checkpoint_filter_fn, from_official_kwargs, official_kwargs_to_model_args

PARITY_DIR = parity_dir("vmamba")
FIXTURES = parity_files("vmamba", "vmamba_*.json")
MANIFESTS = parity_files("vmamba", "manifest_*.json")
NO_FIXTURES = f"official parity fixtures not found in {PARITY_DIR}"
OFFICIAL_TO_ZOO = {
    "vssm1_tiny_0230s": "vmamba_tiny", "vssm1_small_0229s": "vmamba_small", "vssm1_base_0229s": "vmamba_base",
    "vssm1_tiny_0230": "vmamba_v2_tiny", "vssm1_small_0229": "vmamba_v2_small", "vssm1_base_0229": "vmamba_v2_base",
    "vssm_tiny": "vmamba_v0_tiny", "vssm_small": "vmamba_v0_small", "vssm_base": "vmamba_v0_base",
}
# the v0 layout on the test-sized widths (gated SS2D, no MLP, patch stem, PatchMerging)
TEST_V0 = dict(d_state=3, ssm_ratio=2.0, stem="patch", downsample="merge", conv_bias=True, gate=True,
               mlp_ratio=0.0, force_fp32=True)


# --- cross scan / merge and the mixer ----------------------------------------------------------------


def test_cross_scan_and_merge_follow_the_traversal_orders():
    height, width = 3, 5  # non-square: a swapped transpose cannot pass
    x = torch.randn(2, 4, height, width, dtype=torch.float64)
    for mode, orders in SCAN_MODES.items():
        xs = cross_scan_2d(x, orders)
        for k, order in enumerate(orders):  # step t of order k reads pixel scan_order_index(order)[t]
            torch.testing.assert_close(xs[:, k], x.flatten(2)[..., scan_order_index(order, height, width)])
        y = torch.randn(2, len(orders), 4, height * width, dtype=torch.float64)
        expected = torch.zeros(2, 4, height * width, dtype=torch.float64)
        for k, order in enumerate(orders):
            expected[..., scan_order_index(order, height, width)] += y[:, k]
        torch.testing.assert_close(cross_merge_2d(y, height, width, orders), expected, msg=mode)
    assert SCAN_MODES["cross2d"] == ("row", "col", "row_reversed", "col_reversed")  # the official k order


def _explicit_ss2d(mixer: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out: every direction scanned on its own by the per-token oracle, then undone."""
    batch, height, width, _ = x.shape
    d, r, n = mixer.d_inner, mixer.dt_rank, mixer.d_state
    h = mixer.in_proj(x)
    h, z = h.chunk(2, dim=-1) if mixer.gate else (h, None)
    u = F.silu(mixer.conv(h.permute(0, 3, 1, 2)))
    y = torch.zeros(batch, d, height * width, dtype=x.dtype)
    for k, order in enumerate(mixer.orders):
        index = scan_order_index(order, height, width)
        tokens = u.flatten(2)[..., index]
        proj = torch.einsum("bdl,cd->bcl", tokens, mixer.x_proj_weight[k])
        dt, Bm, Cm = proj.split([r, n, n], dim=1)
        rows = slice(k * d, (k + 1) * d)
        out = selective_scan_naive(
            tokens, torch.einsum("brl,dr->bdl", dt, mixer.dt_projs_weight[k]), -mixer.A_logs[rows].exp(),
            Bm[:, None], Cm[:, None], mixer.Ds[rows], delta_bias=mixer.dt_projs_bias[k], delta_softplus=True)
        y[..., index] += out
    y = mixer.out_norm(y.transpose(1, 2)).reshape(batch, height, width, d)
    if mixer.gate:
        y = y * F.silu(z)
    return mixer.out_proj(y)


@pytest.mark.parametrize("gate,d_state", [(True, 16), (False, 1)], ids=["v0_gate_n16", "v05noz_n1"])
def test_mixer_matches_explicit_construction(gate, d_state, monkeypatch):
    torch.manual_seed(0)
    mixer = SS2D(dim=8, d_state=d_state, ssm_ratio=1.5, gate=gate).double().eval()
    with torch.no_grad():  # make the recurrence and the per-direction parameters matter
        mixer.x_proj_weight.mul_(3.0)
        mixer.A_logs.add_(torch.randn_like(mixer.A_logs) * 0.3)
        mixer.dt_projs_bias.add_(torch.randn_like(mixer.dt_projs_bias))
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)

    # all four directions go through zoo.ops in one grouped call: count it with a pass-through backend
    scan_module = importlib.import_module("zoo.ops.selective_scan")
    monkeypatch.delenv("ZOO_SCAN_BACKEND", raising=False)
    seen = []
    reference = scan_module._BACKENDS["reference"]

    def counting_scan(u, delta, A, B, *args, **kwargs):
        seen.append((tuple(u.shape), tuple(B.shape)))
        return reference.scan(u, delta, A, B, *args, **kwargs)

    monkeypatch.setitem(scan_module._BACKENDS, "counting",
                        scan_module._Backend("counting", lambda d: (True, "test"), counting_scan, priority=100))
    with torch.no_grad():
        out = mixer(x)
        expected = _explicit_ss2d(mixer, x)
    assert seen == [((2, 4 * mixer.d_inner, 35), (2, 4, d_state, 35))]
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


# --- official parity --------------------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
@pytest.mark.parametrize("scan_backend", ["reference", "compiled"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_official_parity(fixture, scan_backend, monkeypatch):
    if scan_backend != "reference" and not zoo.ops.available_backends("cpu")[scan_backend].name == scan_backend:
        pytest.skip(f"the {scan_backend} scan backend is not usable on this machine")
    monkeypatch.setenv("ZOO_SCAN_BACKEND", scan_backend)
    meta, tensors, official_sd = load_fixture(fixture)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model = from_official_kwargs(**meta["official_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_sd, model), strict=True)
    calls = []
    real = SS2D._forward_rows
    monkeypatch.setattr(SS2D, "_forward_rows", lambda self, x: calls.append(1) or real(self, x))
    assert_matches_official(model, meta, tensors)
    if scan_backend == "compiled":  # CPU inference: the channels-last mixer with the compiled kernels
        assert len(calls) == sum(len(s.blocks) for s in model.stages)
    else:
        assert not calls and zoo.ops.last_backend().name == "reference"


def _legacy_layout(official_sd):
    """The names older official checkpoints use, and Linear2d weights saved as 1x1 convs."""
    conv_shaped = ("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")
    return {key: value[:, :, None, None] if key.endswith(conv_shaped) else value
            for key, value in older_vmamba_codebase_names(official_sd).items()}


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_checkpoint_layouts(fixture):
    meta, _, official_sd = load_fixture(fixture)
    model = from_official_kwargs(**meta["official_kwargs"])
    expected = checkpoint_filter_fn(official_sd, model)
    assert set(expected) == set(model.state_dict())
    other = {k: v + 1 for k, v in official_sd.items()}  # a distinguishable second set of weights
    layouts = {
        "model": {"model": official_sd, "epoch": 3},
        "model_ema only": {"model_ema": official_sd},
        "legacy names": _legacy_layout(official_sd),
        "zoo": expected,
    }
    for name, checkpoint in layouts.items():
        got = checkpoint_filter_fn(checkpoint, model)
        assert got.keys() == expected.keys(), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)
    both = {"model": official_sd, "model_ema": other}
    assert torch.equal(checkpoint_filter_fn(both)["norm.weight"], expected["norm.weight"])
    assert torch.equal(checkpoint_filter_fn(both, use_ema=True)["norm.weight"], expected["norm.weight"] + 1)
    with pytest.raises(KeyError, match="no 'model_ema'"):
        checkpoint_filter_fn({"model": official_sd}, use_ema=True)


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_legacy_names_and_conv_shaped_linears_load_strictly():
    for fixture in FIXTURES:
        meta, tensors, official_sd = load_fixture(fixture)
        model = from_official_kwargs(**meta["official_kwargs"]).eval()
        model.load_state_dict(checkpoint_filter_fn(_legacy_layout(official_sd), model), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(tensors["input"]), tensors["logits"], rtol=meta["rtol"], atol=meta["atol"])


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_official_style_checkpoint_loads_through_timm(tmp_path):
    """An official-layout .pth (weights under 'model' next to a pickled config) via pretrained_cfg file."""
    meta, _, official_sd = load_fixture([f for f in FIXTURES if "v2v" in f.name][0])
    args = official_kwargs_to_model_args(**meta["official_kwargs"])
    check_official_style_file(tmp_path, "vmamba_tiny", official_sd, args, checkpoint_filter_fn,
                              ("stages.3.blocks.0.mixer.A_logs", "layers.3.blocks.0.op.A_logs"))


@pytest.mark.skipif(not MANIFESTS, reason=NO_FIXTURES)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=fixture_id)
def test_manifest_loads_strictly(manifest):
    model, meta = load_manifest_on_meta(manifest, OFFICIAL_TO_ZOO, checkpoint_filter_fn)
    assert model.dims == meta["stage_dims"]
    # the recorded official constructor kwargs describe the registered architecture
    args = official_kwargs_to_model_args(**meta["constructor_kwargs"])
    registered = {k: v for k, v in args.items() if k not in ("drop_path_rate", "norm_layer", "img_size")}
    mixer = model.stages[0].blocks[0].mixer
    assert tuple(args["depths"]) == tuple(len(s.blocks) for s in model.stages)
    assert (registered["d_state"], registered["gate"], registered["force_fp32"]) == (
        mixer.d_state, mixer.gate, mixer.force_fp32)
    # the release URL is the one the official README gives for this checkpoint
    assert model.pretrained_cfg["url"] == meta["readme"]["ckpt"]


# --- the timm interface on the test-sized variant ------------------------------------------------------


@pytest.mark.parametrize("layout", [{}, TEST_V0], ids=["current", "v0"])
def test_forward_backward_odd_sizes(layout):
    model = timm.create_model("test_vmamba", num_classes=5, **layout)
    x = torch.randn(2, 3, 36, 52)  # stage maps 9x13, 5x7, 3x4, 2x2: odd sides at every downsample
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "some parameter got no gradient"
    dir_grads = model.stages[0].blocks[0].mixer.x_proj_weight.grad
    assert all(dir_grads[k].abs().sum() > 0 for k in range(4))

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 2, model.num_features)  # NHWC, like timm's Swin
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [tuple(t.shape[1:]) for t in inter] == [(8, 9, 13), (16, 5, 7), (32, 3, 4), (64, 2, 2)]
    assert {"stages.0.blocks.0.mixer.A_logs", "stages.3.blocks.0.mixer.Ds"} <= model.no_weight_decay()


@pytest.mark.parametrize("layout", [{}, TEST_V0], ids=["current", "v0"])
def test_bfloat16_model_and_autocast_follow_fp32(layout):
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba", **layout).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x)
        half = model.bfloat16()(x.bfloat16())  # fp32 scan outputs meet bf16 norm weights here
    assert autocast.dtype == half.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (autocast.float() - reference).abs().max() < 0.05 * scale
    assert (half.float() - reference).abs().max() < 0.05 * scale


@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (3, 32, 32), (1, 3, 2, 40)])
def test_bad_input_is_named(shape):
    model = timm.create_model("test_vmamba")
    with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\) with H and W >= 4"):
        model(torch.randn(shape))


def test_features_only_strides():
    model = timm.create_model("test_vmamba", features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [8, 32] and model.feature_info.channels() == [16, 64]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 8, 12), (1, 64, 2, 3)]


def test_pos_embed_resizes_for_other_inputs():
    model = timm.create_model("test_vmamba", pos_embed=True, img_size=32).eval()
    assert model.patch_embed.pos_embed.shape == (1, 8, 8, 8)
    assert "patch_embed.pos_embed" in model.no_weight_decay()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 1000)


def test_from_official_kwargs_refuses_unsupported_flags():
    with pytest.raises(ValueError, match=r"forward_type='m0_noz'.*downsample_version='none'.*unknown kwargs \['bogus'\]"):
        from_official_kwargs(depths=[1, 1, 1, 1], dims=8, forward_type="m0_noz", downsample_version="none", bogus=1)
    with pytest.raises(ValueError, match=r"forward_type='v052dc_noz'"):  # cascade2d is not implemented
        from_official_kwargs(depths=[1, 1, 1, 1], dims=8, forward_type="v052dc_noz")
    with pytest.raises(ValueError, match=r"'v0' needs norm_layer='ln'"):
        from_official_kwargs(depths=[1, 1, 1, 1], dims=8, forward_type="v0", norm_layer="ln2d")
    # postfixes as the official parser reads them
    args = official_kwargs_to_model_args(forward_type="v052d_onsigmoid_nozact_oact_no32")
    assert (args["scan_mode"], args["out_norm"], args["gate"], args["gate_act"], args["out_act"]) == (
        "bidi", "sigmoid", True, False, True)
    assert official_kwargs_to_model_args(forward_type="v2")["force_fp32"]
    assert not official_kwargs_to_model_args(forward_type="v2_no32")["force_fp32"]
    with pytest.raises(RuntimeError, match=r"no downloadable pretrained weights.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model("test_vmamba", pretrained=True)


@pytest.mark.parametrize("forward_type,keys", [
    ("v05_ondwconv3_noz", {"out_norm.1.weight": (8, 1, 3, 3)}),
    ("v05_oncnorm", {"out_norm.0.weight": (8,), "out_norm.0.bias": (8,), "out_norm.2.weight": (8, 1, 3, 3)}),
    ("v05_onsoftmax_noz", {}),
])
def test_out_norm_variants_keep_official_keys(forward_type, keys):
    model = from_official_kwargs(depths=[1, 1, 1, 1], dims=8, ssm_ratio=1.0, forward_type=forward_type,
                                 mlp_ratio=0.0, downsample_version="v3", patchembed_version="v2").eval()
    mixer = model.stages[0].blocks[0].mixer
    own = {k[len("stages.0.blocks.0.mixer."):]: tuple(v.shape) for k, v in model.state_dict().items()
           if k.startswith("stages.0.blocks.0.mixer.out_norm")}
    assert own == keys
    y = torch.randn(2, 3, 5, 8)
    if forward_type.startswith("v05_onsoftmax"):  # a softmax over the pixels of every channel
        torch.testing.assert_close(mixer.out_norm(y), y.flatten(1, 2).softmax(1).view_as(y))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 36, 44))).all()


def test_vlm_tower():
    from zoo.vlm import ZooVisionTower

    torch.manual_seed(0)
    tower = ZooVisionTower("test_vmamba", image_size=64)
    x = torch.randn(2, 3, 64, 64)
    tokens = tower(x)
    assert (tower.num_patches, tower.hidden_size) == (4, 64) and tokens.shape == (2, 4, 64)
    with torch.no_grad():  # the last stage map (no final norm), flattened row-major
        last = tower.vision_tower.forward_intermediates(x, intermediates_only=True)[-1]
    torch.testing.assert_close(tokens, last.flatten(2).transpose(1, 2))
