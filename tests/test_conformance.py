"""Conformance suite: every zoo family's test-sized variant honours the same timm-model contract.

The cases come from the registry (``zoo.registry.list_test_models()``), so a family that lands later is
tested here with no new test code, and a family still in progress simply has no cases yet.
Tiny models, small inputs, CPU only.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import zoo
from zoo import registry

MODELS = registry.list_test_models()
NUM_CLASSES = 7
BATCH = 2

pytestmark = pytest.mark.skipif(not MODELS, reason="no zoo family has registered a test variant")


def _make(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.create_model(name, **kwargs)


def _input(name: str, batch: int = BATCH, seed: int = 1, size=None) -> torch.Tensor:
    channels, height, width = registry.model_info(name).input_size
    if size is not None:
        height, width = size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator)


def _pre_logits_width(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=rtol)


def _as_list(feats):
    return list(feats) if isinstance(feats, (list, tuple)) else [feats]


@pytest.mark.parametrize("name", MODELS)
def test_create_by_name_matches_registry(name):
    info = registry.model_info(name)
    model = _make(name)
    assert name in zoo.list_models(family=info.family)
    assert registry.get_family(name) == info.family
    assert type(model) is type(timm.create_model(name))
    assert sum(p.numel() for p in model.parameters()) == info.num_params  # meta count == real count
    assert info.is_test


@pytest.mark.parametrize("name", MODELS)
def test_logits_features_and_head(name):
    model = _make(name, num_classes=NUM_CLASSES).eval()
    x = _input(name)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        head_logits = model.forward_head(feats)
        pre_logits = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    assert _close(head_logits, logits)
    assert pre_logits.shape == (BATCH, _pre_logits_width(model))


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = _make(name, num_classes=NUM_CLASSES).eval()
    x = _input(name)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        no_head = model(x)
        # without a classifier the model returns exactly its pre-logits features
        assert _close(no_head, pre_logits)
        model.reset_classifier(11)
        assert model(x).shape == (BATCH, 11)
    assert model.num_classes == 11


@pytest.mark.parametrize("name", MODELS)
def test_features_only_and_intermediates(name):
    info = registry.model_info(name)
    feature_model = _make(name, features_only=True).eval()
    model = _make(name).eval()  # same seed: identical trunk weights
    x = _input(name)
    with torch.no_grad():
        maps = feature_model(x)
        intermediates = model.forward_intermediates(
            x, indices=list(feature_model.feature_info.out_indices), intermediates_only=True)
    channels = feature_model.feature_info.channels()
    reductions = feature_model.feature_info.reduction()
    assert len(maps) == len(channels) == len(reductions) >= 1
    height, width = x.shape[-2:]
    for fmap, chs, red in zip(maps, channels, reductions):
        assert fmap.ndim == 4 and fmap.shape[1] == chs, (fmap.shape, chs)
        assert abs(fmap.shape[2] - height / red) < 1 and abs(fmap.shape[3] - width / red) < 1, (fmap.shape, red)
    # the registry's feature facts describe the same maps
    for chs, red in zip(channels, reductions):
        assert (chs, red) in set(zip(info.feature_channels, info.feature_reductions))
    assert len(intermediates) == len(maps)
    for a, b in zip(intermediates, maps):
        assert _close(a, b), (a.shape, b.shape)


def _count_module_calls(model: nn.Module):
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for m in model.modules() if not list(m.children())]
    return calls, handles


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_identical(name):
    model = _make(name, num_classes=NUM_CLASSES).train()
    x = _input(name)
    weights = torch.randn(BATCH, NUM_CLASSES, generator=torch.Generator().manual_seed(3))
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        calls, handles = _count_module_calls(model)
        out = model(x)
        (out * weights).sum().backward()
        for h in handles:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads, calls[0]))
    (out0, grads0, calls0), (out1, grads1, calls1) = results
    assert calls1 > calls0, "set_grad_checkpointing(True) did not recompute anything in backward"
    assert torch.equal(out0, out1)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("name", MODELS)
def test_non_default_input_size(name):
    info = registry.model_info(name)
    model = _make(name, num_classes=NUM_CLASSES).eval()
    _, height, width = info.input_size
    # non-square, non-default, still a multiple of the largest stride
    size = (height, width + max(info.max_reduction, 16))
    x = _input(name, size=size)
    try:
        with torch.no_grad():
            out = model(x)
    except (ValueError, AssertionError, RuntimeError) as err:
        message = str(err)
        assert str(size[1]) in message and "size" in message.lower(), f"unclear error: {message!r}"
        assert info.fixed_input_size, f"{name} is not declared fixed-size but rejected {size}: {message}"
        return
    assert not info.fixed_input_size, f"{name} is declared fixed-size but accepted {size}"
    assert out.shape == (BATCH, NUM_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_round_trip(name, tmp_path):
    model = _make(name, seed=0).eval()
    other = _make(name, seed=123).eval()
    x = _input(name)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(other(x), expected), "seeds gave identical models; the check would be empty"
        other.load_state_dict(load_file(str(path)), strict=True)
        assert torch.equal(other(x), expected)


@pytest.mark.parametrize("name", MODELS)
def test_eval_determinism_and_batch_independence(name):
    model = _make(name, num_classes=NUM_CLASSES).eval()
    x = _input(name, batch=3)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        for i in range(x.shape[0]):
            alone = model(x[i:i + 1])
            assert _close(alone[0], first[i], atol=1e-5, rtol=1e-4), i


@pytest.mark.parametrize("name", MODELS)
def test_backward_finite_grads(name):
    model = _make(name, num_classes=NUM_CLASSES).train()
    x = _input(name).requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad}"
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(out).all()


ZOO_MODELS = [n for n in MODELS if registry.model_info(n).source == "zoo"]


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_bad_input_shape_is_named(name):
    """The zoo's own families name a wrong input (channels, rank) instead of failing deep inside."""
    model = _make(name).eval()
    channels = registry.model_info(name).input_size[0]
    x = _input(name)
    for bad in (x[:, :1].repeat(1, channels + 1, 1, 1), x[0]):
        with pytest.raises(ValueError, match=rf"\(B, {channels}, H, W\)"):
            model(bad)


@pytest.mark.parametrize("name", MODELS)
def test_meta_device_shape_inference(name):
    """A model moved to the meta device infers output shapes without memory (as model_info builds it)."""
    model = _make(name, num_classes=NUM_CLASSES).eval().to("meta")
    out = model(_input(name).to("meta"))
    assert out.device.type == "meta" and out.shape == (BATCH, NUM_CLASSES)
