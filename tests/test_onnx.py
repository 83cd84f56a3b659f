"""ONNX export: each zoo-implemented family's test variant goes through torch.onnx.export(dynamo=True)
and onnxruntime, with the default scan backend, and matches eager PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import zoo  # noqa: E402,F401  (registers the models)
from zoo.ops import resolve_backend  # noqa: E402

# small inputs: the exported scan is unrolled over the tokens (ConvLLaVA's 5-stage network needs 64)
FAMILIES = {
    "test_vim": 16,
    "test_msvmamba": 16,
    "test_vmamba": 16,
    "test_mambavision": 32,
    "test_convllava": 64,
}


def _onnx_outputs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, optimize=False)  # the optimiser triples the run time
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_onnx_round_trip_matches_eager(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = FAMILIES[name]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    eager_backend = resolve_backend(x.device).name
    got = _onnx_outputs(model, x)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    # the export swapped in the reference scan only while exporting: eager keeps its backend
    with torch.no_grad():
        again = model(x)
    assert resolve_backend(x.device).name == eager_backend
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_legacy_exporter_says_to_use_dynamo(tmp_path):
    model = timm.create_model("test_vim").eval()
    with pytest.raises(RuntimeError, match="zoo models export to ONNX with the dynamo exporter only.*dynamo=True"):
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(tmp_path / "vim.onnx"), dynamo=False)
