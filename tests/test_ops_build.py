"""The kernel loader: boolean environment switches, the cache location, validation of a cached library
before it is loaded (truncated / empty / garbage -> rebuilt, said once), and quiet CPU-only runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zoo.ops import _build, compiled

REPO = Path(__file__).resolve().parents[1]
CPU_KERNELS, WHY = compiled.kernels_available("cpu")
needs_kernels = pytest.mark.skipif(not CPU_KERNELS, reason=f"compiled CPU kernels unavailable: {WHY}")


@pytest.mark.parametrize("raw,want", [("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
                                      ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_env_flag_accepts_the_usual_spellings(monkeypatch, raw, want):
    monkeypatch.setenv("ZOO_TEST_FLAG", raw)
    assert _build.env_flag("ZOO_TEST_FLAG") is want


def test_env_flag_unset_is_the_default_and_nonsense_is_an_error(monkeypatch):
    monkeypatch.delenv("ZOO_TEST_FLAG", raising=False)
    assert _build.env_flag("ZOO_TEST_FLAG") is False and _build.env_flag("ZOO_TEST_FLAG", True) is True
    monkeypatch.setenv("ZOO_TEST_FLAG", "maybe")
    with pytest.raises(ValueError, match=r"ZOO_TEST_FLAG='maybe' is not a boolean; accepted: 1/true/yes/on"):
        _build.env_flag("ZOO_TEST_FLAG")


@pytest.mark.parametrize("raw", ["true", "yes", "on", "1"])
def test_zoo_no_ext_true_disables_the_kernels(monkeypatch, raw):
    monkeypatch.setattr(_build, "_state", {"cpu": None, "cuda": None})
    monkeypatch.setenv("ZOO_NO_EXT", raw)
    ok, reason = _build.ensure_loaded_unlocked("cpu")
    assert not ok and reason == f"disabled by ZOO_NO_EXT={raw}"


def test_empty_ext_cache_means_the_default_cache(monkeypatch):
    monkeypatch.setenv("ZOO_EXT_CACHE", "")
    assert _build._cache_root() == Path.home() / ".cache" / "zoo_ext"
    monkeypatch.setenv("ZOO_EXT_CACHE", "/some/where")
    assert _build._cache_root() == Path("/some/where")


def _built_library() -> Path:
    build_dir, kwargs = _build._jit_spec("cpu")
    lib = build_dir / f"{kwargs['name']}.so"
    if not lib.exists() or _build.library_problem(lib) is not None:
        pytest.skip("no recorded CPU library in the cache (built ahead of time?)")
    return lib


@needs_kernels
@pytest.mark.parametrize("damage,problem", [
    (lambda b: b[: len(b) // 2], "bytes, the build wrote"),
    (lambda b: b"", "it is 0 bytes"),
    (lambda b: bytes(len(b)), "checksum differs"),
])
def test_damaged_cached_library_is_detected(tmp_path, damage, problem):
    lib = _built_library()
    copy = tmp_path / lib.name
    shutil.copy2(lib, copy)
    shutil.copy2(_build._record_path(lib), _build._record_path(copy))
    assert _build.library_problem(copy) is None
    copy.write_bytes(damage(lib.read_bytes()))
    assert problem in _build.library_problem(copy)
    _build._record_path(copy).write_text("{not json")
    assert "build record is unreadable" in _build.library_problem(copy)


SCAN = textwrap.dedent("""
    import torch
    from zoo.ops import selective_scan, last_backend
    u = torch.randn(1, 2, 5)
    selective_scan(u, u.abs(), -torch.rand(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    print("BACKEND", last_backend().name)
""")


def _run(env_extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_extra)
    env.pop("ZOO_NO_EXT", None)
    return subprocess.run([sys.executable, "-W", "always", "-c", SCAN], capture_output=True, text=True, env=env,
                          timeout=600, cwd=str(REPO))


@needs_kernels
def test_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A truncated library used to SIGBUS the process; now it is relinked once, with one warning, and
    neither run prints torch's "No CUDA runtime is found" (no GPU here, a CUDA toolkit may be)."""
    lib = _built_library()
    cache = tmp_path / "cache"
    shutil.copytree(lib.parent, cache / lib.parent.name, ignore=shutil.ignore_patterns("lock"))
    bad = cache / lib.parent.name / lib.name
    bad.write_bytes(lib.read_bytes()[:4096])
    res = _run({"ZOO_EXT_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "BACKEND compiled" in res.stdout
    assert res.stderr.count("is damaged (it is 4096 bytes") == 1, res.stderr
    assert "building zoo kernels (cpu; once, cached in" in res.stderr
    assert _build.library_problem(bad) is None  # rebuilt and recorded
    again = _run({"ZOO_EXT_CACHE": str(cache)})  # a second process loads it without a word
    assert "BACKEND compiled" in again.stdout and "damaged" not in again.stderr and "building" not in again.stderr
    # CPU-only runs (building or loading) do not trigger torch's CUDA_HOME warning
    for run in (res, again):
        assert "No CUDA runtime is found" not in run.stderr, run.stderr


def test_cpu_variant_has_a_cache_key_of_its_own():
    default_dir, _ = _build._jit_spec("cpu")
    variant_dir, kwargs = _build._jit_spec("cpu", _build.AS_AVX2_CFLAGS)
    assert variant_dir != default_dir
    assert kwargs["extra_cflags"][-len(_build.AS_AVX2_CFLAGS):] == _build.AS_AVX2_CFLAGS
    assert Path(_build.AS_AVX2_CFLAGS[-1]).is_file()


def test_cpu_variant_refuses_once_the_kernels_are_loaded():
    ok, why = compiled.kernels_available("cpu")
    if not ok:
        pytest.skip(f"needs the CPU kernels: {why}")
    with pytest.raises(RuntimeError, match="before the first zoo op"):
        _build.load_cpu_variant(_build.AS_AVX2_CFLAGS)
