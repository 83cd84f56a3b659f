"""MSVMamba: official parity fixtures, manifests, the timm interface, and the multi-direction scan seam."""
from __future__ import annotations

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F

from _parity import (assert_matches_official, check_official_style_file, fixture_id, load_fixture,
                     load_manifest_on_meta, older_vmamba_codebase_names, parity_dir, parity_files)
import zoo  # noqa: F401  (registers the models)
from zoo.ops import selective_scan_naive
from zoo.ops.multi_direction import (
    MSVMAMBA_LOW_RES_ORDERS,
    SCAN_ORDERS,
    last_multi_direction_backend,
    register_multi_direction_backend,
    selective_scan_multi_direction,
    unregister_multi_direction_backend,
)
from zoo.models.msvmamba import (
    FULL_RES_SLOT,
    LOW_RES_SLOT,
    MultiScaleSS2D,
    checkpoint_filter_fn,
    from_official_kwargs,
    official_kwargs_to_model_args,
)

PARITY_DIR = parity_dir("msvmamba")
FIXTURES = parity_files("msvmamba", "msvmamba_*.json")
MANIFESTS = parity_files("msvmamba", "manifest_*.json")
NO_FIXTURES = f"official parity fixtures not found in {PARITY_DIR}"
OFFICIAL_TO_ZOO = {"vssm_nano_ms_e300": "msvmamba_nano", "vssm_micro_ms_e300": "msvmamba_micro",
                   "vssm_tiny_ms_e300": "msvmamba_tiny"}


# --- the multi-direction seam ---------------------------------------------------------------------


def _scan_inputs(batch=2, dim=3, n=2, height=3, width=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = height * width
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5, A=-torch.rand(dim, n, generator=g, dtype=dtype) - 0.1,
        B=r(batch, 1, n, L), C=r(batch, 1, n, L), D=r(dim), delta_bias=r(dim) * 0.3,
    )


def _materialised_multi_direction(t, height, width, orders):
    """The official construction: flipped/transposed copies concatenated, one scan, results undone."""

    def reorder(x, order):  # (..., H*W) row-major -> traversal order
        grid = x.reshape(*x.shape[:-1], height, width)
        seq = grid.flatten(-2) if order in ("row", "row_reversed") else grid.transpose(-1, -2).flatten(-2)
        return seq.flip(-1) if order.endswith("reversed") else seq

    def restore(y, order):  # traversal order -> row-major
        y = y.flip(-1) if order.endswith("reversed") else y
        if order.startswith("col"):
            y = y.reshape(*y.shape[:-1], width, height).transpose(-1, -2).flatten(-2)
        return y

    cat = lambda x: torch.cat([reorder(x, o) for o in orders], dim=-1)  # noqa: E731
    y = selective_scan_naive(cat(t["u"]), cat(t["delta"]), t["A"], cat(t["B"]), cat(t["C"]), t["D"],
                             delta_bias=t["delta_bias"], delta_softplus=True)
    L = height * width
    return torch.stack([restore(y[..., k * L:(k + 1) * L], o) for k, o in enumerate(orders)], dim=1)


@pytest.mark.parametrize("orders", [MSVMAMBA_LOW_RES_ORDERS, SCAN_ORDERS], ids=["msvmamba3", "all4"])
def test_multi_direction_matches_materialised_concatenation(orders):
    height, width = 3, 5  # non-square, so a swapped transpose cannot pass
    t = _scan_inputs(height=height, width=width)
    out = selective_scan_multi_direction(**t, height=height, width=width, orders=orders)
    assert out.shape == (2, len(orders), 3, height * width) and out.dtype == torch.float64
    torch.testing.assert_close(out, _materialised_multi_direction(t, height, width, orders), rtol=1e-10, atol=1e-10)

    # the state carries across direction boundaries: resetting it per direction gives another result
    separate = torch.cat([_materialised_multi_direction(t, height, width, (o,)) for o in orders], dim=1)
    assert (separate[:, 1:] - out[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(separate[:, :1], out[:, :1], rtol=1e-10, atol=1e-10)


def test_multi_direction_gradcheck():
    t = _scan_inputs(batch=1, dim=2, n=2, height=2, width=3, seed=1)
    names = ["u", "delta", "B", "C", "D"]
    for k in names:
        t[k].requires_grad_(True)

    def fn(*xs):
        kw = dict(t, **dict(zip(names, xs)))
        return selective_scan_multi_direction(**kw, height=2, width=3)

    assert torch.autograd.gradcheck(fn, [t[k] for k in names], eps=1e-6, atol=1e-6)


def test_multi_direction_backend_hook_and_errors():
    t = _scan_inputs(dtype=torch.float32)
    calls = []

    def direct_kernel(u, delta, A, B, C, D, delta_bias, height, width, orders, delta_softplus):
        calls.append((height, width, orders))
        return torch.full((u.shape[0], len(orders), u.shape[1], height * width), 7.0)

    register_multi_direction_backend("fake_direct", lambda dev: (True, "test kernel"), direct_kernel, priority=5)
    try:
        out = selective_scan_multi_direction(**t, height=3, width=5)
        assert calls == [(3, 5, MSVMAMBA_LOW_RES_ORDERS)] and bool((out == 7).all())
        assert last_multi_direction_backend().name == "fake_direct"
        ref = selective_scan_multi_direction(**t, height=3, width=5, backend="reference")
        assert last_multi_direction_backend().name == "reference+reference" and len(calls) == 1
        torch.testing.assert_close(ref, _materialised_multi_direction(t, 3, 5, MSVMAMBA_LOW_RES_ORDERS).float(),
                                   rtol=1e-4, atol=1e-5)
    finally:
        unregister_multi_direction_backend("fake_direct")
    register_multi_direction_backend("fake_absent", lambda dev: (False, "no device"), direct_kernel, priority=5)
    try:
        selective_scan_multi_direction(**t, height=3, width=5)
        choice = last_multi_direction_backend()
        assert choice.name == "reference" and "fake_absent: no device" in choice.reason
        with pytest.raises(RuntimeError, match="fake_absent.*no device"):
            selective_scan_multi_direction(**t, height=3, width=5, backend="fake_absent")
    finally:
        unregister_multi_direction_backend("fake_absent")

    with pytest.raises(ValueError, match=r"15 tokens but height x width = 4 x 4"):
        selective_scan_multi_direction(**t, height=4, width=4)
    with pytest.raises(ValueError, match=r"unknown scan order.*diagonal.*accepted"):
        selective_scan_multi_direction(**t, height=3, width=5, orders=("row", "diagonal"))
    with pytest.raises(ValueError, match="unknown selective-scan backend 'nope'"):
        selective_scan_multi_direction(**t, height=3, width=5, backend="nope")


# --- the mixer against an explicit construction on an odd map --------------------------------------
# written from the official multiscale_4scan_12 forward, not imported from the code under test: the
# low-resolution map is read back to front row-major, then column-major, then column-major back to
# front (one concatenated sequence), with parameter slot 0; the full-resolution scan uses slot 1
OFFICIAL_LOW_RES_ORDERS = ("row_reversed", "col", "col_reversed")
OFFICIAL_LOW_RES_SLOT, OFFICIAL_FULL_RES_SLOT = 0, 1


def test_mixer_matches_explicit_construction_on_odd_map(monkeypatch):
    torch.manual_seed(0)
    mixer = MultiScaleSS2D(dim=8, d_state=3, se_reduction=4).double().eval()
    with torch.no_grad():  # make the recurrence and the slots matter
        mixer.x_proj_weight.mul_(3.0)
        mixer.A_logs[: mixer.d_inner].add_(0.5)
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)  # odd map: low-res branch is 3 x 4

    # every scan goes through zoo.ops: count the calls with a high-priority pass-through backend
    scan_module = importlib.import_module("zoo.ops.selective_scan")
    monkeypatch.delenv("ZOO_SCAN_BACKEND", raising=False)
    monkeypatch.delenv("ZOO_MULTI_DIRECTION_BACKEND", raising=False)
    seen = []
    reference = scan_module._BACKENDS["reference"]

    def counting_scan(u, *args, **kwargs):
        seen.append(u.shape[-1])
        return reference.scan(u, *args, **kwargs)

    monkeypatch.setitem(scan_module._BACKENDS, "counting",
                        scan_module._Backend("counting", lambda d: (True, "test"), counting_scan, priority=100))
    with torch.no_grad():
        out = mixer(x)
    assert sorted(seen) == sorted([3 * 3 * 4, 5 * 7])  # low-res: one scan of 3 directions

    # explicit: materialised flips/transposes, per-token oracle scans, pixel-wise undo
    with torch.no_grad():
        xz = mixer.in_proj(x)
        xi, z = xz.chunk(2, dim=-1)
        xi = xi.permute(0, 3, 1, 2)
        full = F.silu(mixer.conv_full(xi))
        low = F.silu(mixer.conv_low(xi))
        assert low.shape[-2:] == (3, 4)

        def params(tokens, slot):
            d = mixer.d_inner
            proj = torch.einsum("bdl,cd->bcl", tokens, mixer.x_proj_weight[slot])
            dt, Bm, Cm = proj.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
            return dict(u=tokens, delta=torch.einsum("brl,dr->bdl", dt, mixer.dt_projs_weight[slot]),
                        A=-mixer.A_logs[slot * d:(slot + 1) * d].exp(), B=Bm[:, None], C=Cm[:, None],
                        D=mixer.Ds[slot * d:(slot + 1) * d], delta_bias=mixer.dt_projs_bias[slot])

        p = params(full.flatten(2), OFFICIAL_FULL_RES_SLOT)
        y_full = selective_scan_naive(**p, delta_softplus=True).transpose(1, 2)
        y_low = _materialised_multi_direction(params(low.flatten(2), OFFICIAL_LOW_RES_SLOT), 3, 4,
                                             OFFICIAL_LOW_RES_ORDERS)
        y_low = mixer.out_norm(y_low.transpose(-1, -2)).sum(1).transpose(1, 2).reshape(2, -1, 3, 4)
        y = mixer.out_norm(y_full).reshape(2, 5, 7, -1) + F.interpolate(
            y_low, size=(5, 7), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        gate = torch.sigmoid(mixer.se.fc2(F.relu(mixer.se.fc1(y.mean((1, 2), keepdim=True)))))
        expected = mixer.out_proj(y * gate * F.silu(z))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


# --- official parity --------------------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
@pytest.mark.parametrize("scan_backend", ["reference", "auto"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_official_parity(fixture, scan_backend, monkeypatch):
    monkeypatch.setenv("ZOO_SCAN_BACKEND", scan_backend)
    monkeypatch.delenv("ZOO_MULTI_DIRECTION_BACKEND", raising=False)
    if scan_backend == "auto" and zoo.ops.resolve_backend("cpu").name == "reference":
        pytest.skip("no faster scan backend on this machine: 'auto' is the reference run")

    meta, tensors, official_sd = load_fixture(fixture)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model = from_official_kwargs(**meta["official_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_sd, model), strict=True)
    assert_matches_official(model, meta, tensors)


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_older_official_key_names_map_to_the_same_weights():
    """Older VMamba-codebase names (ln_1, self_attention, patch_embed.proj/norm, no classifier prefix)."""
    meta, _, official_sd = load_fixture(FIXTURES[0])
    model = from_official_kwargs(**meta["official_kwargs"])
    expected = checkpoint_filter_fn(official_sd, model)
    legacy = older_vmamba_codebase_names(official_sd)
    assert any(".ln_1." in k for k in legacy) and any(".self_attention." in k for k in legacy)
    got = checkpoint_filter_fn(legacy, model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    model.load_state_dict(got, strict=True)


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_official_style_checkpoint_loads_through_timm(tmp_path):
    """An official-layout .pth (weights under 'model' next to a pickled config) via pretrained_cfg file."""
    meta, _, official_sd = load_fixture(FIXTURES[0])
    args = official_kwargs_to_model_args(**meta["official_kwargs"])
    check_official_style_file(tmp_path, "msvmamba_nano", official_sd, args, checkpoint_filter_fn,
                              ("stages.3.blocks.0.mixer.A_logs", "layers.3.blocks.0.op.A_logs"))


@pytest.mark.skipif(not MANIFESTS, reason=NO_FIXTURES)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=fixture_id)
def test_manifest_loads_strictly(manifest):
    model, meta = load_manifest_on_meta(manifest, OFFICIAL_TO_ZOO, checkpoint_filter_fn)
    # the recorded official constructor kwargs describe the same architecture
    args = official_kwargs_to_model_args(**meta["constructor_kwargs"])
    assert tuple(args["depths"]) == tuple(len(s.blocks) for s in model.stages)
    assert [int(args["dims"]) * 2 ** i for i in range(4)] == model.dims
    assert args["d_state"] == model.stages[0].blocks[0].mixer.d_state and args["se_reduction"] == 8


# --- the timm interface on the test-sized variant ------------------------------------------------------


def test_forward_backward_any_size_and_head():
    model = timm.create_model("test_msvmamba", num_classes=5)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 36, 52)  # stage maps 9x13, 5x7, 3x4, 2x2: every merge pads
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "some parameter got no gradient"
    slot_grads = model.stages[0].blocks[0].mixer.x_proj_weight.grad
    assert slot_grads[LOW_RES_SLOT].abs().sum() > 0 and slot_grads[FULL_RES_SLOT].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 2, model.num_features)  # NHWC, like timm's Swin
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [tuple(t.shape[1:]) for t in inter] == [(8, 9, 13), (16, 5, 7), (32, 3, 4), (64, 2, 2)]
        last_only = model.forward_intermediates(x, indices=1, intermediates_only=True, norm=True)
        torch.testing.assert_close(last_only[0], feats.permute(0, 3, 1, 2))
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert {"stages.0.blocks.0.mixer.A_logs", "stages.3.blocks.0.mixer.Ds"} <= model.no_weight_decay()


@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (3, 32, 32), (1, 3, 2, 40)])
def test_bad_input_is_named(shape):
    model = timm.create_model("test_msvmamba")
    with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\) with H and W >= 4"):
        model(torch.randn(shape))
    with pytest.raises(ValueError, match="expected an image batch"):
        model.forward_intermediates(torch.randn(shape))


def test_features_only_strides():
    model = timm.create_model("test_msvmamba", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [8, 16, 32, 64]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 32, 4, 6), (1, 64, 2, 3)]
    sub = timm.create_model("test_msvmamba", features_only=True, out_indices=(1, 2))
    assert sub.feature_info.reduction() == [8, 16] and len(sub.model.stages) == 3  # stage 3 pruned


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    model = timm.create_model("test_msvmamba")
    x = torch.randn(1, 3, 32, 32)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=lambda m: f"{n}: {m}")


def test_from_official_kwargs_refuses_unsupported_flags():
    with pytest.raises(ValueError, match=r"sscore_type='None'.*sep_norm=True.*unknown kwargs \['bogus'\]"):
        from_official_kwargs(depths=[1, 1, 1, 1], dims=8, ms_stage=[0, 1, 2, 3], sscore_type="None",
                             sep_norm=True, bogus=1)
    with pytest.raises(ValueError, match=r"ms_stage=\[0, 1\].*every stage"):
        from_official_kwargs(depths=[1, 1, 1, 1], dims=8, ms_stage=[0, 1], ssm_d_state=1)
    auto = from_official_kwargs(depths=[1, 1, 1, 1], dims=12, ms_stage=[0, 1, 2, 3], ssm_d_state="auto")
    assert [s.blocks[0].mixer.d_state for s in auto.stages] == [2, 4, 8, 16]  # ceil(C / 6) per stage
    with pytest.raises(RuntimeError, match=r"no downloadable pretrained weights.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model("test_msvmamba", pretrained=True)


def test_load_pretrained_zoo_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("test_msvmamba", num_classes=4)
    path = tmp_path / "test_msvmamba.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = timm.create_model("test_msvmamba", num_classes=4)
    target.load_pretrained(path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    mismatch = r"does not fit this model: .*shape mismatch .*patch_embed\.norm\.bias: \(8,\) vs \(16,\)"
    with pytest.raises(RuntimeError, match=mismatch):
        timm.create_model("test_msvmamba", dims=16).load_pretrained(path)


def test_training_after_inference_mode_on_the_same_map_size():
    # the traversal indices are cached per map size; one first built under inference_mode must still
    # be usable by autograd afterwards
    model = timm.create_model("test_msvmamba")
    x = torch.randn(1, 3, 44, 28)  # a map size no other test uses, so the cache starts cold
    model.eval()
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()
    assert model.stages[0].blocks[0].mixer.x_proj_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["test_msvmamba", "test_convllava"])
def test_pretrained_without_url_points_at_the_local_file_route(name):
    with pytest.raises(RuntimeError, match=r"no downloadable pretrained weights.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model(name, pretrained=True)
