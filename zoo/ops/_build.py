"""Just-in-time build of the selective-scan kernels in ``csrc/``.

The CPU library (op schemas + CPU kernels) and the CUDA library (CUDA kernels for the same ops) are
built separately with ``torch.utils.cpp_extension.load`` (ninja) on first use and cached in
``$ZOO_EXT_CACHE`` (default ``~/.cache/zoo_ext``) under a key made of the torch version, the CUDA
version, the target architecture and a hash of the sources, so a changed source or a different torch
rebuilds instead of loading a stale library. Libraries built ahead of time (``ZOO_BUILD_EXT=1 pip
install -e .``, see ``zoo_build.py``) are used first when they are importable.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ["scan_cpu.cpp", "mixer_cpu.cpp", "rows_cpu.cpp", "linear_cpu.cpp"]
CUDA_SOURCES = ["scan_cuda.cu", "scan_cuda_lpar.cu", "mixer_cuda.cu"]
# -fno-trapping-math lets GCC if-convert the clamps of the kernels' exp, without which no loop calling
# it is vectorised (the kernels do not rely on floating-point exceptions). No -march: the hot kernels
# carry one clone per ISA level chosen at load time (csrc/cpu_vec.h), so the library is portable and
# nothing host-specific belongs in the cache key.
CPU_CFLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
# extra flags of load_cpu_variant that build the kernels as an AVX2 CPU runs them (csrc/cpu_as_avx2.h), so that a
# machine with AVX-512 also tests and times the AVX2 clones and hand-written AVX2 paths
AS_AVX2_CFLAGS = ["-include", str(CSRC / "cpu_as_avx2.h")]


def _cxx_is_clang() -> bool:
    """Whether the C++ compiler the extension builder runs (``$CXX``, else ``c++``) is clang. False when it
    cannot be run: the flags, and with them the cache key of a library built earlier, then stay as for GCC
    (the compiler of torch's Linux builds), so a cached library still loads on a machine without a compiler."""
    try:
        banner = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in banner.lower()


@functools.lru_cache(maxsize=None)
def cpu_build_flags() -> Tuple[List[str], List[str]]:
    """(compile flags, link flags) of the CPU library. at::parallel_for is an OpenMP loop compiled into the
    caller, so without -fopenmp the kernels run on one thread whatever torch.get_num_threads() says. It is
    added on Linux unless the compiler is clang: GCC links libgomp by its soname and so reuses the copy Linux
    torch builds load, where clang's -fopenmp would load LLVM's libomp beside it; elsewhere the kernels stay
    single-threaded rather than run two OpenMP runtimes in one process."""
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and not _cxx_is_clang() else []
    return CPU_CFLAGS + openmp, openmp


_lock = threading.Lock()
_state = {"cpu": None, "cuda": None}  # None: not tried; True: loaded; str: why it failed
_warned = set()


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case); unset: ``default``."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; accepted: 1/true/yes/on or 0/false/no/off")


CUDA_SCAN_ENV = "ZOO_CUDA_SCAN"


def cuda_scan_lparallel() -> bool:
    """Whether ``ZOO_CUDA_SCAN=lparallel`` opts in to the v2 CUDA kernels (the L-parallel scan and, for
    inference, the fused Vim mixer on CUDA). Unset, empty or ``default``: no. Read on every call and
    parsed exactly as ``csrc/scan_cuda_lpar.cu`` does, so Python and the kernels never disagree."""
    raw = os.environ.get(CUDA_SCAN_ENV)
    if raw is None or raw in ("", "default"):
        return False
    if raw == "lparallel":
        return True
    raise ValueError(f"{CUDA_SCAN_ENV} must be unset, 'default' or 'lparallel', got {raw!r}")


def _cache_root() -> Path:
    # an empty ZOO_EXT_CACHE means the default, not the current directory
    return Path(os.environ.get("ZOO_EXT_CACHE") or Path.home() / ".cache" / "zoo_ext")


def _sources_hash(names: List[str], flags: List[str] = ()) -> str:
    h = hashlib.sha256(" ".join(flags).encode())  # changed compiler flags rebuild too
    headers = sorted(p.name for pattern in ("*.h", "*.cuh") for p in CSRC.glob(pattern))
    for name in list(names) + headers:  # every shared header may be included by the sources
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


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning, which
    its import logs on every machine with a CUDA toolkit but no GPU (meaningless for the CPU kernels)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    quiet = logging.Filter()
    quiet.filter = lambda record: "No CUDA runtime is found" not in record.getMessage()
    log.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        log.removeFilter(quiet)
    return cpp_extension


def _jit_spec(kind: str, extra_cflags: Sequence[str] = ()) -> Tuple[Path, dict]:
    """The build directory (one per torch version, target, source and flag hash) and the load() arguments."""
    if kind == "cpu":
        sources, cuda = CPU_SOURCES, ""
        cflags, ldflags = cpu_build_flags()
        cflags = cflags + list(extra_cflags)
        key = f"cpu-{platform.machine()}"
    else:
        archs = cuda_arch_list()
        sources, cflags, ldflags, cuda = CUDA_SOURCES, ["-O3"], [], torch.version.cuda or "none"
        key = f"cuda{cuda}-sm" + "_".join(a.replace(".", "") for a in archs)
    tag = f"torch{torch.__version__.split('+')[0]}-{key}-{_sources_hash(sources, cflags)}".replace(".", "")
    build_dir = _cache_root() / tag
    kwargs = dict(
        name=f"zoo_scan_{kind}",
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=env_flag("ZOO_EXT_VERBOSE"),
    )
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = cuda_flags(archs)
        kwargs["extra_include_paths"] = [str(CSRC)]
    return build_dir, kwargs


# written next to a library after a successful build; a cached library is loaded only if it matches
# (a truncated one killed the process with SIGBUS, a garbage one failed to load forever)
RECORD_SUFFIX = ".record.json"


def _digest(lib: Path) -> str:
    return hashlib.sha256(lib.read_bytes()).hexdigest()


def _record_path(lib: Path) -> Path:
    return lib.with_name(lib.name + RECORD_SUFFIX)


def _write_record(lib: Path) -> None:
    tmp = lib.with_name(f"{lib.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"size": lib.stat().st_size, "sha256": _digest(lib)}))
        os.replace(tmp, _record_path(lib))
    except OSError:  # the library is loaded already; without a record the next process relinks it
        tmp.unlink(missing_ok=True)


def library_problem(lib: Path) -> Optional[str]:
    """Why a cached library must not be loaded (None: it matches its build record)."""
    try:
        record = json.loads(_record_path(lib).read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its build record is unreadable"
    actual = lib.stat().st_size
    if actual != size:
        return f"it is {actual} bytes, the build wrote {size}"
    if _digest(lib) != digest:
        return "its checksum differs from the one recorded at build time"
    return None


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One process at a time checks, builds and records a build directory (e.g. DDP ranks starting
    together): otherwise one could remove a library another is still linking, before its record."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "zoo_build.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): cpp_extension's own baton still guards the build
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_library_ok(kind: str, lib: Path) -> bool:
    """Whether the cached library is intact; a damaged one is removed (and said so once)."""
    if not lib.exists():
        return False
    if not _record_path(lib).exists():  # built before records existed, or interrupted: relink quietly
        lib.unlink()
        return False
    problem = library_problem(lib)
    if problem is None:
        return True
    _warn_once(f"damaged-{kind}", f"zoo.ops: the cached {kind} kernel library {lib} is damaged ({problem}); "
                                  "rebuilding it")
    lib.unlink()  # ninja relinks it (recompiling only what is missing)
    return False


def _load_or_build(kind: str, extra_cflags: Sequence[str] = ()) -> Optional[str]:
    """Loads the cached library, building it first if needed; returns why it cannot be built (None:
    loaded). Compiler errors raise."""
    build_dir, kwargs = _jit_spec(kind, extra_cflags)
    lib = build_dir / f"{kwargs['name']}.so"
    with _build_lock(build_dir):
        if _cached_library_ok(kind, lib):
            torch.ops.load_library(str(lib))
            return None
        missing = _toolchain_missing(kind)
        if missing is not None:
            return missing
        cpp_extension = _cpp_extension()
        print(f"zoo.ops: building zoo kernels ({kind}; once, cached in {build_dir}) ...", file=sys.stderr,
              flush=True)
        cpp_extension.load(**kwargs)
        _write_record(lib)
    return None


def _toolchain_missing(kind: str) -> Optional[str]:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (set CXX or install g++)"
    try:
        _cpp_extension().verify_ninja_availability()
    except Exception:
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda":
        CUDA_HOME = _cpp_extension().CUDA_HOME

        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
        if not nvcc.exists() and shutil.which("nvcc") is None:
            return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def load_cpu_variant(extra_cflags: Sequence[str]) -> None:
    """Loads the CPU kernels compiled with ``extra_cflags`` in place of the default library (built once and cached
    like it, under a key of its own). For benchmarks that build the kernels another way, such as the AVX2 mode of
    benchmarks/bench_cpu.py; call it before any zoo op has run, since a process holds one library of the ops."""
    with _lock:
        if _state["cpu"] is not None:
            raise RuntimeError("zoo.ops: the CPU kernels are loaded (or failed to load) already; "
                               "load_cpu_variant must run before the first zoo op")
        missing = _load_or_build("cpu", extra_cflags)
        if missing is not None:
            raise RuntimeError(f"zoo.ops: cannot build the CPU kernel variant: {missing}")
        _state["cpu"] = True


# torch.compile / strict export trace the backend probe; dynamo cannot enter the lock (a cold first call
# under torch.compile(fullgraph=True) failed), so under tracing this runs eagerly, outside the graph, and
# its result enters the graph as a constant
@torch.compiler.assume_constant_result
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
    try:
        disabled = env_flag("ZOO_NO_EXT")
    except ValueError as e:
        _state[kind] = f"disabled: {e}"
        _warn_once("no-ext", f"zoo.ops: {e}; the compiled kernels stay off until it is fixed")
        return False, _state[kind]
    if disabled:
        _state[kind] = f"disabled by ZOO_NO_EXT={os.environ['ZOO_NO_EXT']}"
        return False, _state[kind]
    if _try_prebuilt(f"_zoo_scan_{kind}"):
        _state[kind] = True
        return True, f"compiled {kind} kernels (built ahead of time)"
    try:
        missing = _load_or_build(kind)
        if missing is None:
            _state[kind] = True
            return True, f"compiled {kind} kernels from csrc/"
        _state[kind] = f"cannot build the {kind} kernels: {missing}"
    except Exception as e:  # compiler errors, missing headers, an unwritable cache...
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        _state[kind] = f"building the {kind} kernels failed ({first}); set ZOO_EXT_VERBOSE=1 for the log"
    _warn_once(
        kind,
        f"zoo.ops: {_state[kind]}. Falling back to the pure-PyTorch reference scan (slower). See docs/kernels.md.",
    )
    return False, _state[kind]
