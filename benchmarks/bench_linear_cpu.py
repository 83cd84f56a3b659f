"""The models' linear-layer shapes on torch's BLAS and on ``zoo_scan::grouped_linear``'s tiles, one process.

For each (M, K, N) of Vim-Ti/S and MSVMamba-N/T at batch 8 it times ``torch.mm`` (MKL here) and the zoo tiles
the dispatch picks on this CPU, and, with ``--avx2``, the same tiles compiled for x86-64-v3 only (AVX2 + FMA)
into a library of their own, so one machine with AVX-512 also shows what an AVX2 CPU would run. The three are
interleaved round by round; the table gives medians in GMAC/s and the BLAS / tiles time ratio.

    python benchmarks/bench_linear_cpu.py --threads 1
    python benchmarks/bench_linear_cpu.py --threads 1 --avx2      # also the x86-64-v3 build of the tiles
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from zoo.ops import _build, compiled  # noqa: E402
from zoo.ops.mixer import cpu_intrinsics, cpu_isa  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from ab_cpu_kernels import rename_flags  # noqa: E402

# (M, K, N): rows = batch 8 x tokens
SHAPES = [(1576, 192, 768), (1576, 384, 192), (1576, 384, 1536), (1576, 768, 384),  # Vim-Ti / Vim-S in, out
          (25088, 48, 192), (25088, 96, 48), (6272, 96, 384), (1568, 384, 192), (392, 384, 1536)]  # MSVMamba


def avx2_tiles():
    """grouped_linear built as an AVX2 CPU runs it (csrc/cpu_as_avx2.h: every ISA clone the x86-64-v3 one, no
    AVX-512 tile picked), in the op namespace zoo_avx2tiles."""
    from torch.utils.cpp_extension import load_inline

    lib = torch.library.Library("zoo_avx2tiles", "DEF")
    lib.define("grouped_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
    avx2_tiles.lib = lib  # the schema lives as long as the process
    src = f'#include "{REPO / "csrc" / "linear_cpu.cpp"}"\n'
    cflags, ldflags = _build.cpu_build_flags()
    build_dir = Path(tempfile.gettempdir()) / "zoo_avx2tiles"
    build_dir.mkdir(exist_ok=True)
    flags = cflags + _build.AS_AVX2_CFLAGS + rename_flags("zoo_avx2tiles")
    load_inline("zoo_avx2tiles", cpp_sources=[src], extra_cflags=flags, extra_ldflags=ldflags,
                is_python_module=False, build_directory=str(build_dir))
    return torch.ops.zoo_avx2tiles.grouped_linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--avx2", action="store_true", help="also time the tiles built for x86-64-v3 only")
    args = p.parse_args()
    ok, why = compiled.kernels_available("cpu")
    if not ok:
        sys.exit(f"the zoo CPU kernels are unavailable: {why}")
    torch.set_num_threads(args.threads)
    impls = {"blas": lambda x, w: torch.mm(x[0], w[0].t()), "zoo": torch.ops.zoo_scan.grouped_linear}
    if args.avx2:
        impls["zoo (avx2 build)"] = avx2_tiles()
    print(f"torch {torch.__version__}, MKL {torch.backends.mkl.is_available()}, vendor "
          f"{torch.ops.zoo_scan.cpu_vendor()}, zoo kernels: {cpu_isa()} clones, hand-written paths: {cpu_intrinsics()}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds, GMAC/s")
    print("| M x K x N | " + " | ".join(impls) + " | " + " | ".join(f"blas / {k}" for k in list(impls)[1:]) + " |")
    print("|---" * (2 * len(impls)) + "|")
    with torch.inference_mode():
        for M, K, N in SHAPES:
            x, w = torch.randn(1, M, K), torch.randn(1, N, K)
            times = {k: [] for k in impls}
            for f in impls.values():
                f(x, w)
            for _ in range(args.rounds):
                for k, f in impls.items():
                    start = time.perf_counter()
                    f(x, w)
                    times[k].append(time.perf_counter() - start)
            med = {k: statistics.median(t) for k, t in times.items()}
            rates = " | ".join(f"{M * K * N / t / 1e9:.1f}" for t in med.values())
            ratios = " | ".join(f"{med['blas'] / med[k]:.2f}" for k in list(impls)[1:])
            print(f"| {M} x {K} x {N} | {rates} | {ratios} |")


if __name__ == "__main__":
    main()
