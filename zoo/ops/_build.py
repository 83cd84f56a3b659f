"""Just-in-time build of the selective-scan kernels in ``csrc/``.

The CPU library (op schemas + CPU kernels) and the CUDA library (CUDA kernels for the same ops) are
built separately with ``torch.utils.cpp_extension.load`` (ninja) on first use and cached in
``$ZOO_EXT_CACHE`` (default ``~/.cache/zoo_ext``) under a key made of the torch version, the CUDA
version, the target architecture and a hash of the sources, so a changed source or a different torch
rebuilds instead of loading a stale library. Libraries built ahead of time (``ZOO_BUILD_EXT=1 pip
install -e .``, see ``zoo_build.py``) are used first when they are importable.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ["scan_cpu.cpp"]
CUDA_SOURCES = ["scan_cuda.cu", "scan_cuda_lpar.cu"]
# -fno-trapping-math lets GCC if-convert the clamps of the kernels' exp, without which no loop calling
# it is vectorised (the kernels do not rely on floating-point exceptions)
CPU_CFLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-march=native"]
_lock = threading.Lock()
_state = {"cpu": None, "cuda": None}  # None: not tried; True: loaded; str: why it failed
_warned = set()


def _cache_root() -> Path:
    return Path(os.environ.get("ZOO_EXT_CACHE", Path.home() / ".cache" / "zoo_ext"))


def _sources_hash(names: List[str], flags: List[str] = ()) -> str:
    h = hashlib.sha256(" ".join(flags).encode())  # changed compiler flags rebuild too
    headers = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".h", ".cuh"))  # included by any source
    for name in names + headers:
        p = CSRC / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def cuda_arch_list() -> List[str]:
    """Architectures to build for: $TORCH_CUDA_ARCH_LIST if set, else those of the visible GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env.replace(";", " ").split()
    archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return archs or ["9.0"]


def cuda_flags(archs: List[str]) -> List[str]:
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    for a in archs:
        num = a.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _try_prebuilt(module: str) -> bool:
    # libraries built by `ZOO_BUILD_EXT=1 pip install -e .` sit next to this file; loading one
    # registers its ops with the dispatcher (they are plain shared libraries, not Python modules)
    for lib in sorted(Path(__file__).resolve().parent.glob(f"{module}*.so")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except OSError:
            continue
    return False


def _jit(kind: str) -> None:
    from torch.utils import cpp_extension

    if kind == "cpu":
        sources, cflags, cuda = CPU_SOURCES, CPU_CFLAGS, ""
        key = f"cpu-{platform.machine()}"
    else:
        archs = cuda_arch_list()
        sources, cflags, cuda = CUDA_SOURCES, ["-O3"], torch.version.cuda or "none"
        key = f"cuda{cuda}-sm" + "_".join(a.replace(".", "") for a in archs)
    tag = f"torch{torch.__version__.split('+')[0]}-{key}-{_sources_hash(sources, cflags)}".replace(".", "")
    build_dir = _cache_root() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        name=f"zoo_scan_{kind}",
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=cflags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("ZOO_EXT_VERBOSE") == "1",
    )
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = cuda_flags(archs)
        kwargs["extra_include_paths"] = [str(CSRC)]
    cpp_extension.load(**kwargs)


def _toolchain_missing(kind: str) -> Optional[str]:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (set CXX or install g++)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except Exception:
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
        if not nvcc.exists() and shutil.which("nvcc") is None:
            return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def ensure_loaded(kind: str) -> Tuple[bool, str]:
    """Loads (building if needed) the ``cpu`` or ``cuda`` library; returns (ok, reason). Never raises."""
    if _state[kind] is True:  # fast path, also what torch.compile traces after the first call
        return True, f"compiled {kind} kernels"
    with _lock:
        return ensure_loaded_unlocked(kind)


def ensure_loaded_unlocked(kind: str) -> Tuple[bool, str]:
    st = _state[kind]
    if st is True:
        return True, f"compiled {kind} kernels from csrc/"
    if isinstance(st, str):
        return False, st
    if os.environ.get("ZOO_NO_EXT") == "1":
        _state[kind] = "disabled by ZOO_NO_EXT=1"
        return False, _state[kind]
    if _try_prebuilt(f"_zoo_scan_{kind}"):
        _state[kind] = True
        return True, f"compiled {kind} kernels (built ahead of time)"
    missing = _toolchain_missing(kind)
    if missing is not None:
        _state[kind] = f"cannot build the {kind} kernels: {missing}"
    else:
        try:
            _jit(kind)
            _state[kind] = True
            return True, f"compiled {kind} kernels from csrc/"
        except Exception as e:  # compiler errors, missing headers...
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            _state[kind] = f"building the {kind} kernels failed ({first}); set ZOO_EXT_VERBOSE=1 for the log"
    _warn_once(
        kind,
        f"zoo.ops: {_state[kind]}. Falling back to the pure-PyTorch reference scan (slower). See docs/kernels.md.",
    )
    return False, _state[kind]
