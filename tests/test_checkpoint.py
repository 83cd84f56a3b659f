"""zoo.checkpoint: safetensors / weights_only loading, and the restricted fallback that never runs pickled code."""
from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch

from zoo import checkpoint as ckpt
from zoo.checkpoint import PickledPlaceholder, extract_state_dict, load_checkpoint_file, load_state_dict_file

PAYLOAD_MODULE = "zoo_test_untrusted_payload"
_EXECUTED: list = []  # anything appended here means pickled code ran


def _record_call(tag):
    _EXECUTED.append(tag)
    return tag


class UntrustedConfig(dict):
    """Shaped like yacs' CfgNode (a dict subclass with instance state); must never run on load."""

    def __setstate__(self, state):
        _EXECUTED.append("setstate")
        self.__dict__.update(state)


class ReduceToCall:
    """Unpickling this calls ``_record_call``, the way a malicious ``__reduce__`` would call os.system."""

    def __reduce__(self):
        return (_record_call, ("reduce",))


@pytest.fixture()
def payload_module():
    """Puts the test classes under a module name that exists only while saving."""
    module = types.ModuleType(PAYLOAD_MODULE)
    for obj in (_record_call, UntrustedConfig, ReduceToCall):
        obj.__module__ = PAYLOAD_MODULE
        setattr(module, obj.__name__, obj)
    sys.modules[PAYLOAD_MODULE] = module
    yield module
    sys.modules.pop(PAYLOAD_MODULE, None)
    for obj in (_record_call, UntrustedConfig, ReduceToCall):
        obj.__module__ = __name__


def _tripwire_module(real: types.ModuleType, touched: list) -> types.ModuleType:
    """A module whose every attribute lookup is recorded (resolving a pickled global looks it up)."""
    trip = types.ModuleType(PAYLOAD_MODULE)

    def __getattr__(name):
        touched.append(name)
        return getattr(real, name)

    trip.__getattr__ = __getattr__
    return trip


def _official_like_checkpoint(tmp_path, payload_module):
    weights = OrderedDict(
        [("layer.weight", torch.randn(4, 3)), ("layer.bias", torch.randn(4)), ("A_logs", torch.rand(2, 1))]
    )
    config = UntrustedConfig(MODEL=OrderedDict(NAME="vssm_nano"), DATA={"IMG_SIZE": 224})
    config.frozen = True  # instance state, so the pickle carries a BUILD (__setstate__) step
    config.deprecated_keys = {"OLD_KEY"}  # a set pickles as protocol-2 '__builtin__.set'
    path = tmp_path / "official_like.pth"
    torch.save({"model": weights, "config": config, "hook": ReduceToCall(), "epoch": 299}, path)
    return path, weights


def test_pickled_classes_become_inert_placeholders(tmp_path, payload_module):
    path, weights = _official_like_checkpoint(tmp_path, payload_module)
    _EXECUTED.clear()
    # the fallback is needed at all: weights_only refuses this file
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)

    touched: list = []
    sys.modules[PAYLOAD_MODULE] = _tripwire_module(payload_module, touched)
    loaded = load_checkpoint_file(path)

    assert _EXECUTED == [], f"pickled code ran while loading: {_EXECUTED}"
    assert touched == [], f"the loader resolved pickled globals: {touched}"
    assert set(loaded["model"]) == set(weights)
    for k, v in weights.items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["epoch"] == 299

    cfg = loaded["config"]
    assert isinstance(cfg, PickledPlaceholder) and not isinstance(cfg, dict)
    assert cfg.pickled_global == f"{PAYLOAD_MODULE}.UntrustedConfig"
    assert cfg.items["DATA"] == {"IMG_SIZE": 224}  # the raw data is still inspectable
    assert cfg.state == {"frozen": True, "deprecated_keys": {"OLD_KEY"}}  # safe builtins are rebuilt
    hook = loaded["hook"]
    assert isinstance(hook, PickledPlaceholder)
    assert hook.pickled_global == f"{PAYLOAD_MODULE}._record_call" and hook.args == ("reduce",)

    assert set(load_state_dict_file(path)) == set(weights)

    # control: an unrestricted load of the same file does run the payload, so the test can fail
    sys.modules[PAYLOAD_MODULE] = payload_module
    torch.load(path, weights_only=False)
    assert "reduce" in _EXECUTED and "setstate" in _EXECUTED
    _EXECUTED.clear()


def test_plain_state_dict_uses_weights_only(tmp_path, monkeypatch):
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "plain.pt"
    torch.save(sd, path)

    def fail(*args, **kwargs):
        raise AssertionError("the restricted fallback should not be needed for a plain state dict")

    monkeypatch.setattr(ckpt, "_torch_load_restricted", fail)
    loaded = load_checkpoint_file(path)
    assert set(loaded) == {"a", "b"} and loaded["b"].dtype == torch.float16
    assert torch.equal(loaded["a"], sd["a"])


def test_safetensors_and_errors(tmp_path):
    from safetensors.torch import save_file

    sd = {"w": torch.randn(3, 2), "v": torch.arange(4)}
    path = tmp_path / "weights.safetensors"
    save_file(sd, str(path))
    loaded = load_checkpoint_file(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert all(t.device.type == "cpu" for t in load_checkpoint_file(path, map_location=torch.device("cpu")).values())
    with pytest.raises(ValueError, match=r"map_location=\{'cuda:0': 'cpu'\}.*one device"):
        load_checkpoint_file(path, map_location={"cuda:0": "cpu"})

    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.pth")
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown suffix '\.npz'.*\.safetensors"):
        load_checkpoint_file(bad)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="expected a mapping"):
        load_checkpoint_file(not_a_dict)


def test_extract_state_dict_unwraps():
    w = torch.zeros(2)
    assert list(extract_state_dict({"model": {"module.x": w, "module.y": w}, "epoch": 1})) == ["x", "y"]
    assert list(extract_state_dict({"state_dict": {"x": w}, "model": {"z": w}})) == ["x"]
    assert list(extract_state_dict({"x": w, "meta": "info"})) == ["x"]
    with pytest.raises(ValueError, match="no tensors"):
        extract_state_dict({"epoch": 3})
