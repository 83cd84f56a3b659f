"""Vim family: official parity fixtures, official key manifests, and the timm model interface."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F

from _parity import load_fixture, parity_dir, parity_files
import zoo
from zoo.layers import ssm as ssm_layers
from zoo.models import vim as vim_mod
from zoo.models.vim import Vim, checkpoint_filter_fn, from_official_kwargs, resample_vim_pos_embed
from zoo.ops import selective_scan_naive

PARITY_DIR = parity_dir("vim")
FIXTURES = parity_files("vim", "vim_*.json")
MANIFESTS = parity_files("vim", "manifest_*.json")
NO_FIXTURES = f"no Vim parity fixtures in {PARITY_DIR} (made by running the official code; not in this checkout)"

REGISTERED = [
    "vim_tiny_patch16_224",
    "vim_tiny_patch16_stride8_224",
    "vim_small_patch16_224",
    "vim_small_patch16_stride8_224",
    "vim_base_patch16_224",
]
# official constructor function name fragment -> registered zoo name
OFFICIAL_TO_ZOO = {
    "vim_tiny_patch16_224": "vim_tiny_patch16_224",
    "vim_tiny_patch16_stride8_224": "vim_tiny_patch16_stride8_224",
    "vim_small_patch16_224": "vim_small_patch16_224",
    "vim_small_patch16_stride8_224": "vim_small_patch16_stride8_224",
    "vim_base_patch16_224": "vim_base_patch16_224",
}


@pytest.fixture(autouse=True)
def _fp32_exact():
    """Parity is defined in fp32 with TF32 off; restore the caller's settings afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _small(**kw) -> Vim:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=8, num_classes=7)
    args.update(kw)
    return Vim(**args)


# --- official parity ------------------------------------------------------------------------------
@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_official_parity(fixture: Path, backend: str, monkeypatch):
    """Through the pure-PyTorch reference scan, and through the best backend (compiled kernels) if
    that is a different one."""
    if backend == "reference":
        monkeypatch.setenv("ZOO_SCAN_BACKEND", "reference")
    else:
        monkeypatch.delenv("ZOO_SCAN_BACKEND", raising=False)
        if zoo.ops.resolve_backend("cpu").name == "reference":
            pytest.skip("the best CPU backend here is the reference scan (covered by the reference case)")
    meta, tensors, state_dict = load_fixture(fixture)
    m = from_official_kwargs(**meta["official_kwargs"])
    m.load_state_dict(checkpoint_filter_fn(state_dict, m), strict=True)
    m.eval()
    x = tensors["input"]
    with torch.no_grad():
        logits = m(x)
        pre_logits = m.forward_head(m.forward_features(x), pre_logits=True)
    if backend == "reference":
        assert zoo.ops.last_backend().name == "reference"
    tol = dict(atol=meta["atol"], rtol=meta["rtol"])
    torch.testing.assert_close(logits, tensors["logits"], **tol)
    torch.testing.assert_close(pre_logits, tensors["pre_logits"], **tol)


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_official_checkpoint_wrapped_and_resized():
    """{'model': ...} wrapping loads; a checkpoint loaded at another image size gives the same result
    as running the original-size model on that size (pos_embed resampled the same way, class row kept)."""
    meta, tensors, state_dict = load_fixture(FIXTURES[0])
    kw = dict(meta["official_kwargs"])
    m = from_official_kwargs(**kw)
    m.load_state_dict(checkpoint_filter_fn({"model": dict(state_dict)}, m), strict=True)
    # a raw training checkpoint: DDP prefixes and non-tensor entries next to the weights
    ddp = {f"module.{k}": v for k, v in state_dict.items()}
    m.load_state_dict(checkpoint_filter_fn({"model_ema": {**ddp, "epoch": 3}, "args": None}, m), strict=True)
    m.eval()
    patch, stride = kw["patch_size"], kw.get("stride", 16)
    big = kw["img_size"] + 2 * stride
    big_model = from_official_kwargs(**dict(kw, img_size=big))
    big_model.load_state_dict(checkpoint_filter_fn(state_dict, big_model), strict=True)
    big_model.eval()
    grid = (big - patch) // stride + 1
    assert big_model.pos_embed.shape[1] == grid * grid + 1
    x = torch.randn(1, 3, big, big, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(big_model(x), m(x), atol=1e-5, rtol=1e-5)
    # the class row is carried over untouched, to the middle index of the new grid
    old_mid = (m.pos_embed.shape[1] - 1) // 2
    torch.testing.assert_close(big_model.pos_embed[0, (grid * grid) // 2], state_dict["pos_embed"][0, old_mid])


@pytest.mark.skipif(not FIXTURES, reason=NO_FIXTURES)
def test_official_pth_through_timm_pretrained_and_zoo_checkpoint(tmp_path):
    """An official-style .pth ({'model': ..., 'args': Namespace}) loads through zoo.checkpoint, and it and a
    plain {'model': ...} file through timm's pretrained path (pretrained_cfg_overlay=dict(file=...))."""
    import argparse

    from zoo.checkpoint import load_state_dict_file

    meta, tensors, state_dict = load_fixture(FIXTURES[0])
    kw = meta["official_kwargs"]
    x = tensors["input"]
    with_args = tmp_path / "official_with_args.pth"
    torch.save({"model": state_dict, "epoch": 299, "args": argparse.Namespace(model="vim")}, with_args)
    m = from_official_kwargs(**kw)
    m.load_state_dict(checkpoint_filter_fn(load_state_dict_file(with_args), m), strict=True)
    plain = tmp_path / "official_plain.pth"
    torch.save({"model": state_dict}, plain)
    timm_models = [timm.create_model(
        "vim_tiny_patch16_224", pretrained=True, img_size=kw["img_size"], patch_size=kw["patch_size"],
        stride=kw["stride"], embed_dim=kw["embed_dim"], depth=kw["depth"], num_classes=kw["num_classes"],
        pretrained_cfg_overlay=dict(file=str(path), num_classes=kw["num_classes"]),
    ) for path in (plain, with_args)]  # the official file with its pickled args, too
    tol = dict(atol=meta["atol"], rtol=meta["rtol"])
    with torch.no_grad():
        for model in (m.eval(), *(t.eval() for t in timm_models)):
            torch.testing.assert_close(model(x), tensors["logits"], **tol)


@pytest.mark.skipif(not MANIFESTS, reason=NO_FIXTURES)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem.split("_bimamba")[0])
def test_official_manifest_loads_strictly(manifest: Path):
    spec = json.loads(manifest.read_text())
    fragment = next(k for k in sorted(OFFICIAL_TO_ZOO, key=len, reverse=True) if k in spec["official_function"])
    with torch.device("meta"):  # vim_base is 98M params: check keys and shapes without allocating
        model = timm.create_model(OFFICIAL_TO_ZOO[fragment])
        zeros = {k: torch.zeros(shape) for k, shape in spec["keys"].items()}
    model.load_state_dict(checkpoint_filter_fn(zeros, model), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]


def test_official_manifest_real_zeros_tiny():
    """Same as above with real (not meta) tensors for the smallest model, through the filter."""
    if not MANIFESTS:
        pytest.skip(NO_FIXTURES)
    spec = json.loads(next(p for p in MANIFESTS if "tiny_patch16_224" in p.name).read_text())
    model = timm.create_model("vim_tiny_patch16_224")
    zeros = {k: torch.zeros(shape) for k, shape in spec["keys"].items()}
    model.load_state_dict(checkpoint_filter_fn(zeros, model), strict=True)
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())


# --- the mixer against the official formulation ---------------------------------------------------
def _official_style_mixer(mixer, x):
    """bimamba v2 the way the official code writes it: flip x and z, causal conv, forward scan, flip
    back; scanned by the per-token naive oracle."""
    xz = mixer.in_proj(x).transpose(1, 2)
    outs = []
    for direction, seq in ((mixer.fwd, xz), (mixer.bwd, xz.flip(-1))):
        xs, z = seq.chunk(2, dim=1)
        length = xs.shape[-1]
        k = direction.conv1d.kernel_size[0]
        u = F.silu(F.conv1d(xs, direction.conv1d.weight, direction.conv1d.bias, padding=k - 1,
                            groups=xs.shape[1])[..., :length])
        dbl = u.transpose(1, 2) @ direction.x_proj.weight.t()
        dt, b, c = dbl.split([direction.dt_rank, direction.d_state, direction.d_state], dim=-1)
        delta = (dt @ direction.dt_proj.weight.t()).transpose(1, 2)
        y = selective_scan_naive(
            u, delta, -torch.exp(direction.A_log), b.transpose(1, 2)[:, None], c.transpose(1, 2)[:, None],
            direction.D, z=z, delta_bias=direction.dt_proj.bias, delta_softplus=True,
        )
        outs.append(y)
    y = (outs[0] + outs[1].flip(-1)) * mixer.out_scale
    return mixer.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("length", [1, 6])
def test_mixer_matches_flip_based_official_formulation(length):
    torch.manual_seed(0)
    mixer = vim_mod.BiMambaMixer(16, d_state=4, expand=2).double()
    with torch.no_grad():
        for d in (mixer.fwd, mixer.bwd):  # make every parameter matter
            d.conv1d.weight.normal_()
            d.dt_proj.bias.normal_()
            d.D.normal_()
            d.A_log.add_(torch.randn_like(d.A_log) * 0.3)
    x = torch.randn(2, length, 16, dtype=torch.float64)
    torch.testing.assert_close(mixer(x), _official_style_mixer(mixer, x), atol=1e-10, rtol=1e-10)


def _official_style_model(m: Vim, x: torch.Tensor, cls_mode: str, pool: str) -> torch.Tensor:
    """The official VisionMamba forward structure (fused add+norm layout: the residual is added before
    each norm), written independently of zoo's wiring; returns pre_logits."""
    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    proj = m.patch_embed.proj
    tokens = F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    n = tokens.shape[1]
    cls = None if cls_mode == "none" else m.cls_token.expand(x.shape[0], -1, -1)
    index = n // 2 if cls_mode == "middle" else 0
    if cls_mode == "middle":
        tokens = torch.cat([tokens[:, :index], cls, tokens[:, index:]], dim=1)
    elif cls_mode == "first":
        tokens = torch.cat([cls, tokens], dim=1)
    hidden, residual = tokens + m.pos_embed, None
    for block in m.blocks:
        residual = hidden if residual is None else residual + hidden
        hidden = _official_style_mixer(block.mixer, rms(residual, block.norm.weight))
    out = rms(residual + hidden, m.norm.weight)
    if cls is not None:
        return out[:, index]
    return out.mean(1) if pool == "mean" else out[:, -1]


@pytest.mark.parametrize(
    "flags, cls_mode, pool",
    [
        (dict(), "middle", ""),
        # 3 x 3 = 9 patches: officially the class token goes to index M // 2 = 4 ((M + 1) // 2 would be 5)
        (dict(img_size=24), "middle", ""),
        (dict(use_middle_cls_token=False, if_divide_out=False), "first", ""),
        (dict(if_cls_token=False, final_pool_type="mean"), "none", "mean"),
        (dict(if_cls_token=False, final_pool_type="none", stride=4), "none", "last"),
    ],
    ids=["middle_cls", "middle_cls_odd_grid", "first_cls_sum", "no_cls_mean", "no_cls_last_stride4"],
)
def test_official_flag_variants_match_official_structure(flags, cls_mode, pool):
    kw = dict(img_size=16, patch_size=8, stride=8, embed_dim=8, depth=2, d_state=4, num_classes=3,
              drop_path_rate=0.0)
    kw.update(flags)
    torch.manual_seed(0)
    m = from_official_kwargs(**kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():  # move every tensor off its init so that all of them matter
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"], dtype=torch.float64)
    with torch.no_grad():
        pre = m.forward_head(m.forward_features(x), pre_logits=True)
        expected = _official_style_model(m, x, cls_mode, pool)
        torch.testing.assert_close(pre, expected, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(m(x), m.head(expected), atol=1e-10, rtol=1e-10)


def test_mixer_gradcheck_float64():
    torch.manual_seed(1)
    mixer = vim_mod.BiMambaMixer(4, d_state=2, expand=1, d_conv=2).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixer, (x,), eps=1e-6, atol=1e-6)


def test_mixer_calls_the_bidirectional_op(monkeypatch):
    calls = []
    real = ssm_layers.selective_scan_bidirectional

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssm_layers, "selective_scan_bidirectional", spy)
    # the unfused path (training, GPUs); CPU inference takes the row-layout kernels (test_mixer_cpu.py)
    monkeypatch.setattr(vim_mod, "fused_mixer_enabled", lambda x, op="bimamba_scan": False)
    m = _small().eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    assert len(calls) == len(m.blocks)
    assert all(c["delta_softplus"] and c["scale"] == 0.5 and c["z"] is not None for c in calls)


def test_divide_out_false_sums_directions():
    torch.manual_seed(0)
    halved = vim_mod.BiMambaMixer(16, d_state=4, divide_out=True)
    summed = vim_mod.BiMambaMixer(16, d_state=4, divide_out=False)
    summed.load_state_dict(halved.state_dict())
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(summed(x), 2 * halved(x))


# --- from_official_kwargs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [("if_rope", True), ("bimamba_type", "v1"), ("use_double_cls_token", True), ("rms_norm", False),
     ("flip_img_sequences_ratio", 0.5), ("init_layer_scale", 1e-6), ("no_such_flag", 1)],
)
def test_from_official_kwargs_rejects_unsupported_flags(flag, value):
    with pytest.raises(ValueError, match=flag):
        from_official_kwargs(img_size=32, patch_size=8, stride=8, embed_dim=16, depth=1, **{flag: value})


def test_from_official_kwargs_defaults_and_quirks():
    # the released vim_base passes the misspelt `if_devide_out`, which the official class ignores
    m = from_official_kwargs(img_size=32, patch_size=8, stride=4, embed_dim=16, depth=3, if_devide_out=True,
                             use_middle_cls_token=False, ssm_cfg={"d_state": 4})
    assert m.patch_embed.grid_size == (7, 7) and m.cls_position == "first"
    assert m.blocks[0].mixer.fwd.A_log.shape == (32, 4)
    assert m.blocks[2].drop_path.drop_prob == pytest.approx(0.1)  # official default drop_path_rate
    no_cls = from_official_kwargs(img_size=32, patch_size=8, stride=8, embed_dim=16, depth=1,
                                  if_cls_token=False, final_pool_type="mean")
    assert no_cls.global_pool == "avg" and no_cls.pos_embed.shape[1] == 16


# --- timm interface -------------------------------------------------------------------------------
def test_registered_models_and_pretrained_cfgs():
    names = set(timm.list_models("*vim*"))
    assert set(REGISTERED) | {"test_vim"} <= names
    for name in REGISTERED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id.startswith("hustvl/Vim-") and cfg.hf_hub_id.endswith("-midclstok")
        assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
        assert tuple(cfg.mean) == timm.data.IMAGENET_DEFAULT_MEAN and tuple(cfg.std) == timm.data.IMAGENET_DEFAULT_STD
    m = zoo.create_model("test_vim", num_classes=3)
    assert isinstance(m, Vim) and m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_test_vim_forward_backward_all_params_get_gradients():
    m = timm.create_model("test_vim")
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert m.blocks[0].mixer.bwd.A_log.grad.abs().sum() > 0


def test_head_interface():
    m = _small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 17, 32)
        pre = m.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats[:, 8])  # middle class token of 16 patches
        torch.testing.assert_close(m(x), m.get_classifier()(pre))
        m.reset_classifier(5)
        assert m(x).shape == (2, 5)
        m.reset_classifier(0)
        torch.testing.assert_close(m(x), pre)
        m.reset_classifier(0, "avg")
        torch.testing.assert_close(m(x), feats.mean(1))
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(0, "max")


def test_forward_intermediates_and_features_only():
    m = _small(depth=3).eval()
    x = torch.randn(2, 3, 40, 32)  # 5x4 grid, non-square on purpose
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=[0, 2], norm=True)
        feats = m.forward_features(x)
        torch.testing.assert_close(final, feats)
        last = inter[-1]
        assert last.shape == (2, 32, 5, 4)
        i = m.cls_token_index((5, 4))
        patches = torch.cat([feats[:, :i], feats[:, i + 1:]], dim=1)
        # token t of the conv raster is (row t // 4, col t % 4) of the map
        torch.testing.assert_close(last.permute(0, 2, 3, 1).reshape(2, 20, 32), patches)
        pairs = m.forward_intermediates(x, indices=1, norm=True, return_prefix_tokens=True, intermediates_only=True)
        torch.testing.assert_close(pairs[0][1][:, 0], feats[:, i])

    fm = timm.create_model("test_vim", features_only=True, out_indices=(0, 1))
    fm.eval()
    with torch.no_grad():
        maps = fm(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape) for t in maps] == [(1, 32, 4, 4)] * 2
    assert fm.feature_info.reduction() == [8, 8]
    fine = timm.create_model("test_vim", features_only=True, out_indices=(1,), stride=4)
    with torch.no_grad():
        assert fine(torch.randn(1, 3, 32, 32))[0].shape == (1, 32, 7, 7)  # (32 - 8) / 4 + 1
    assert fine.feature_info.reduction() == [4]


def test_prune_intermediate_layers():
    m = _small(depth=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = m.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        kept = m.prune_intermediate_layers([1], prune_head=True)
        assert kept == [1] and len(m.blocks) == 2 and isinstance(m.head, nn.Identity)
        torch.testing.assert_close(m.forward_intermediates(x, indices=[1], intermediates_only=True)[0], expected)


def test_grad_checkpointing_same_gradients():
    m = _small()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(enable)
        m(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_no_weight_decay_and_group_matcher():
    m = _small(depth=3)
    nwd = m.no_weight_decay()
    ssm = {n for n in dict(m.named_parameters()) if n.endswith(("A_log", ".D"))}
    assert len(ssm) == 3 * 4 and ssm | {"pos_embed", "cls_token"} <= nwd
    groups = timm.optim.param_groups_weight_decay(m, 0.05, no_weight_decay_list=nwd)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(m.named_parameters())
    assert all(id(named[n]) in no_decay for n in ssm)
    assert id(named["blocks.0.mixer.in_proj.weight"]) not in no_decay
    grouping = timm.models.group_parameters(m, m.group_matcher())
    assert sorted(n for names in grouping.values() for n in names) == sorted(named)
    assert len(grouping) == 3 + 2  # stem, one per block, final norm (+head)


# --- dynamic input size ---------------------------------------------------------------------------
def test_dynamic_input_size_and_clear_error():
    m = _small().eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 48, 24)).shape == (1, 7)
        assert m(torch.randn(1, 3, 8, 8)).shape == (1, 7)
    with pytest.raises(ValueError, match=r"30x32.*\(H - 8\) % 8 == 0"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected an image batch"):
        m(torch.randn(1, 1, 32, 32))
    overlap = _small(stride=4).eval()  # (H - 8) % 4 == 0
    with torch.no_grad():
        assert overlap.forward_features(torch.randn(1, 3, 36, 32)).shape == (1, 8 * 7 + 1, 32)
    with pytest.raises(ValueError, match="34x32"):
        overlap(torch.randn(1, 3, 34, 32))


def test_pos_embed_resample_keeps_class_row_and_raster_order():
    grid = (3, 4)
    pe = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1).repeat(1, 1, 2)
    cls = torch.full((1, 1, 2), -5.0)
    with_cls = torch.cat([pe[:, :6], cls, pe[:, 6:]], dim=1)  # middle index 12 // 2
    out = resample_vim_pos_embed(with_cls, (6, 8), grid, "middle", interpolation="nearest", antialias=False)
    assert out.shape == (1, 49, 2)
    assert torch.equal(out[0, 24], cls[0, 0])
    patches = torch.cat([out[:, :24], out[:, 25:]], dim=1).reshape(6, 8, 2)[..., 0]
    assert torch.equal(patches[::2, ::2], pe[0, :, 0].reshape(3, 4))  # nearest 2x upsampling
    flat = resample_vim_pos_embed(torch.ones(1, 17, 3), (7, 7), None, "middle")
    torch.testing.assert_close(flat, torch.ones(1, 50, 3))
    with pytest.raises(ValueError, match="not a square"):
        resample_vim_pos_embed(torch.ones(1, 13, 3), (4, 4), None, "middle")


# --- ShuffleMamba layer-wise shuffle --------------------------------------------------------------
class _TokenwiseRecorder(nn.Module):
    """A per-token block (so any permutation must be undone exactly) that records what it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x * 2 + 1


def test_layer_shuffle_permutes_patch_tokens_and_restores_order():
    torch.manual_seed(0)
    m = _small(depth=3, layer_shuffle_prob=1.0)
    assert [m._shuffle_probability(i) for i in range(3)] == [0.0, 0.5, 1.0]
    last = _TokenwiseRecorder()
    m.blocks[2] = last
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        ref_tokens = m._embed(x)[0]
        ref_tokens = m.blocks[1](m.blocks[0](ref_tokens))
        expected = m.forward_features(x)
        assert torch.equal(last.seen[-1], ref_tokens)  # eval: never shuffled
        m.train()
        got = m.forward_features(x)
    torch.testing.assert_close(got, expected)  # order restored after the shuffled block
    seen = last.seen[-1]
    assert not torch.equal(seen, ref_tokens)  # p = 1 at the last block: shuffled
    assert torch.equal(seen[:, 8], ref_tokens[:, 8])  # class token kept at its (middle) index
    for b in range(2):  # each sample's tokens are a permutation of its own tokens
        assert torch.equal(seen[b].sort(dim=0).values, ref_tokens[b].sort(dim=0).values)


def test_layer_shuffle_changes_training_output_only():
    base = _small(seed=1)
    shuffled = _small(seed=1, layer_shuffle_prob=1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shuffled.eval()(x), base.eval()(x))
        torch.manual_seed(5)
        assert not torch.allclose(shuffled.train()(x), base.train()(x))


# --- mixed precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_residual_fp32_and_finite(dtype):
    m = _small(seed=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.eval()(x)
    m.train()
    with torch.autocast("cpu", dtype=dtype):
        _, inter = m.forward_intermediates(x, output_fmt="NLC")
        out = m(x)
    assert all(t.dtype == torch.float32 for t in inter)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_autocast_keeps_the_class_token_in_fp32():
    """The class token and position embedding enter the fp32 residual unrounded under autocast (the
    official concatenation promotes to fp32 too); only the patch conv runs in half precision."""
    m = _small(seed=2).eval()
    with torch.no_grad():
        m.cls_token.fill_(1 + 2 ** -12)  # not representable in bf16
        x = torch.randn(1, 3, 32, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, grid = m._embed(x)
    i = m.cls_token_index(grid)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens[:, i], (m.cls_token + m.pos_embed[:, i])[:, 0], atol=0, rtol=0)
