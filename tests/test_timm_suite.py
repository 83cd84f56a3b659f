"""timm's own model battery (``tests/test_models.py`` from timm's sdist on PyPI) on the zoo's models.

The test file is not in this repository: it is fetched once with ``pip download timm==<installed>
--no-binary :all: --no-deps`` into pytest's cache folder, imported, and its test functions are called
here on the zoo-implemented families' tiny test variants, exactly as timm calls them on its own models
(the same function bodies, sizes and tolerances). Classification follows timm's lists: Vim is a token
model like timm's ViTs (``pool_size`` None), so it gets timm's non-standard cfg test, as ``vit_*`` do;
``forward_intermediates`` tests run on every zoo family (timm runs them on the modules listed in its
``FEAT_INTER_FILTERS``, which the zoo's modules cannot be in).

Without network access to PyPI the tests skip, unless ``ZOO_REQUIRE_PARITY=1`` (CI), where they fail.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the zoo models before timm's test module lists models)
from _parity import REQUIRE_ENV
from zoo.ops._build import env_flag

ZOO_TEST_MODELS = ["test_vim", "test_msvmamba", "test_convllava"]
TOKEN_MODELS = {"test_vim"}  # timm's NON_STD group: no 2-D unpooled map, pool_size None

# (timm test function, its extra arguments after model_name)
BATTERY = [
    ("test_model_forward", dict(batch_size=1)),
    ("test_model_backward", dict(batch_size=2)),
    ("test_model_default_cfgs", dict(batch_size=1, cfg_device="meta")),
    ("test_model_forward_torchscript", dict(batch_size=1)),
    ("test_model_forward_features", dict(batch_size=1)),
    ("test_model_forward_intermediates_features", dict(batch_size=1)),
    ("test_model_forward_intermediates", dict(batch_size=1)),
    ("test_model_forward_fx", dict(batch_size=1)),
    ("test_model_backward_fx", dict(batch_size=2)),
    ("test_model_forward_fx_torchscript", dict(batch_size=1)),
]


def _fetch_timm_tests(cache_dir: Path) -> Path:
    target = cache_dir / f"timm-{timm.__version__}" / "test_models.py"
    if target.is_file():
        return target
    download = cache_dir / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-binary", ":all:",
           "--no-deps", "-q", "-d", str(download)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sdists = sorted(download.glob(f"timm-{timm.__version__}.tar.gz"))
    if result.returncode != 0 or not sdists:
        message = f"could not fetch timm's sdist from PyPI ({' '.join(cmd)}): {result.stderr.strip()[-300:]}"
        if env_flag(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    with tarfile.open(sdists[0]) as tar:
        member = tar.getmember(f"timm-{timm.__version__}/tests/test_models.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tar.extractfile(member).read())
    return target


@pytest.fixture(scope="module")
def timm_tests(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`: fetch into a temp dir
    folder = cache.mkdir("timm_test_models") if cache is not None else tmp_path_factory.mktemp("timm_test_models")
    path = _fetch_timm_tests(Path(folder))
    spec = importlib.util.spec_from_file_location("timm_upstream_test_models", path)
    module = importlib.util.module_from_spec(spec)
    # timm's module switches TorchScript to the profiling executor; keep the process's settings
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    try:
        spec.loader.exec_module(module)
    finally:
        torch._C._jit_set_profiling_executor(executor)
        torch._C._jit_set_profiling_mode(mode)
    return module


@pytest.mark.parametrize("model_name", ZOO_TEST_MODELS)
@pytest.mark.parametrize("test_name, kwargs", BATTERY, ids=[b[0] for b in BATTERY])
def test_timm_battery(timm_tests, test_name, kwargs, model_name):
    if test_name == "test_model_default_cfgs" and model_name in TOKEN_MODELS:
        test_name = "test_model_default_cfgs_non_std"
    fn = getattr(timm_tests, test_name)
    fn = getattr(fn, "__wrapped__", fn)
    fn(model_name, **kwargs)
