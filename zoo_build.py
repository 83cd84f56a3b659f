"""Ahead-of-time build of the selective-scan kernels (``ZOO_BUILD_EXT=1 pip install -e .``).

``setup.py`` calls :func:`ahead_of_time_extensions` only when ``ZOO_BUILD_EXT=1``; a plain install
compiles nothing and the kernels are built just in time on first use instead (``zoo/ops/_build.py``).
The libraries land in ``zoo/ops/`` as ``_zoo_scan_cpu*.so`` / ``_zoo_scan_cuda*.so``; they are plain
shared libraries that register ``torch.ops.zoo_scan`` kernels when loaded (not Python modules), and
``zoo.ops`` loads them before trying a JIT build. The CUDA library is built only when nvcc is found;
``TORCH_CUDA_ARCH_LIST`` picks the architectures (default 9.0).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent


def ahead_of_time_extensions() -> Tuple[List[object], Dict[str, object]]:
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    import importlib.util

    # the JIT loader's flags, read without importing the zoo package (which needs timm at build time)
    spec = importlib.util.spec_from_file_location("_zoo_build_flags", ROOT / "zoo" / "ops" / "_build.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    (cpu_cflags, cpu_ldflags), cuda_flags = flags.cpu_build_flags(), flags.cuda_flags

    exts: List[object] = [
        CppExtension("zoo.ops._zoo_scan_cpu", [str(ROOT / "csrc" / s) for s in flags.CPU_SOURCES],
                     extra_compile_args={"cxx": cpu_cflags}, extra_link_args=cpu_ldflags),
    ]
    has_nvcc = (CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists()) or shutil.which("nvcc")
    if has_nvcc:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(";", " ").split()
        exts.append(
            CUDAExtension("zoo.ops._zoo_scan_cuda", [str(ROOT / "csrc" / s) for s in flags.CUDA_SOURCES],
                          extra_compile_args={"cxx": ["-O3"], "nvcc": cuda_flags(archs)},
                          include_dirs=[str(ROOT / "csrc")])
        )
    return exts, {"build_ext": BuildExtension}
