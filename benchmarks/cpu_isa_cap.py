"""Benchmarks run as on an AVX2 CPU, on a machine with AVX-512 (issue 12's target class is AVX2 + FMA).

Two parts, both needed for a fair ratio: the zoo kernels are compiled with ``csrc/cpu_as_avx2.h`` (every ISA
clone is the x86-64-v3 one and the feature checks answer as an AVX2 CPU), and the baselines' libraries are
capped at AVX2 through their own switches (ATen's kernels, oneDNN's convolutions, MKL's GEMMs), which they read
once at start-up, so the process re-executes itself with them set. The core's FMA pipes, caches and clock stay
those of this machine: the mode shows what the code does on AVX2, not how fast an older core is.
"""
from __future__ import annotations

import getpass
import os
import sys
import tempfile
from pathlib import Path

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def host_has_avx2() -> bool:
    """Whether this CPU runs x86-64-v3 code (AVX2, FMA, BMI2, ...), read from /proc/cpuinfo (Linux x86-64)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"avx2", "fma", "bmi2", "movbe", "f16c"} <= set(flags)


def reexec_as_avx2() -> None:
    """Re-executes this Python process with the baselines' AVX2 caps in its environment (returns at once when they
    are set already, i.e. in the re-executed process). Exits with a message on a CPU without AVX2."""
    if all(os.environ.get(k) == v for k, v in AVX2_ENV.items()):
        return
    if not host_has_avx2():
        sys.exit("--as-avx2 needs a CPU with AVX2 + FMA (x86-64-v3); this one has not")
    env = {**os.environ, **AVX2_ENV}
    # torch.compile's on-disk cache does not key its C++ kernels on ATEN_CPU_CAPABILITY: code generated for 16-lane
    # AVX-512 vectors, reloaded and built for AVX2's 8, wrote half its outputs (garbage indices in --compile runs)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                      f"torchinductor_{getpass.getuser()}")
    env["TORCHINDUCTOR_CACHE_DIR"] = cache.rstrip("/") + "_as_avx2"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def load_zoo_kernels_as_avx2() -> None:
    """Loads the zoo CPU kernels compiled as an AVX2 CPU runs them, in place of the default library. Call before any
    zoo op has run."""
    from zoo.ops import _build

    _build.load_cpu_variant(_build.AS_AVX2_CFLAGS)
