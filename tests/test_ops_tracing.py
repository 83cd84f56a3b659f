"""Deployment paths that trace the scan: a cold-process torch.compile(fullgraph=True) as the first call
(the kernel loader must not be traced), and torch.export leaving later eager calls untouched (no
fake tensor may be cached by the index builders)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the models)
from zoo.ops import multi_direction

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_name", ["test_vim", "test_msvmamba"])
def test_cold_process_compile_fullgraph_is_the_first_call(model_name):
    # a fresh interpreter: the kernels are not loaded yet when dynamo traces the first forward
    code = textwrap.dedent(f"""
        import torch, timm, zoo
        from zoo.ops import _build
        assert _build._state["cpu"] is None, "the kernels must not be loaded before the compiled call"
        torch.manual_seed(0)
        model = timm.create_model({model_name!r}).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            got = torch.compile(model, fullgraph=True, backend="eager")(x)
            # Vim's CPU inference runs the fused mixer ops, which bypass the scan dispatcher
            print("KERNELS", _build._state["cpu"] is True)
            want = model(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-4000:]
    from zoo.ops import compiled

    if compiled.kernels_available("cpu")[0]:  # where the kernels build, the compiled graph used them
        assert "KERNELS True" in res.stdout, res.stdout


def test_export_then_eager_returns_real_tensors():
    multi_direction._INDEX_CACHE.clear()  # as in a fresh process: the export is the first call
    torch.manual_seed(0)
    model = timm.create_model("test_msvmamba").eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        eager = model(x)
        # same model rebuilt and run eagerly without any export in between: the reference answer
        multi_direction._INDEX_CACHE.clear()
        fresh = model(x)
    assert type(eager) is torch.Tensor, type(eager)
    torch.testing.assert_close(eager, fresh)
    torch.testing.assert_close(exported.module()(x), fresh, rtol=1e-5, atol=1e-5)
    assert all(type(t) is torch.Tensor for v in multi_direction._INDEX_CACHE.values()
               for t in (v if isinstance(v, tuple) else (v,)))


def test_index_builders_cache_nothing_made_under_a_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    multi_direction._INDEX_CACHE.clear()
    with FakeTensorMode():
        fake = multi_direction.scan_order_index("col", 3, 5)
    assert type(fake) is not torch.Tensor
    real = multi_direction.scan_order_index("col", 3, 5)
    assert type(real) is torch.Tensor
    assert real.tolist() == [r * 5 + c for c in range(5) for r in range(3)]  # column-major over a 3 x 5 map
