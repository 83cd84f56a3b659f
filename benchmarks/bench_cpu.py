"""CPU inference throughput: zoo's models next to the timm models users pick instead, one run.

Every pair runs in the same process, interleaved round by round (one timed forward of each model per
round, so a load change on a shared machine hits all of them alike); the table shows the median
images/s over the rounds and the zoo / baseline ratio, then the ratio round by round (median and
quartiles). fp32, ``torch.inference_mode``, random weights and inputs. Runs once per thread count
(default: 1 thread, then all cores).

    python benchmarks/bench_cpu.py                      # the full table, 1 and all threads
    python benchmarks/bench_cpu.py --only vim_tiny --threads 1 --rounds 3
    python benchmarks/bench_cpu.py --only vmamba --threads 1       # VMamba-T vs ConvNeXt-T
    python benchmarks/bench_cpu.py --pair vmamba_v0_tiny,convnext_tiny --threads 1 --rounds 3
    python benchmarks/bench_cpu.py --threads 1 --as-avx2   # on an AVX-512 CPU: everything as on an AVX2 one
    python benchmarks/bench_cpu.py --threads 1 --only vim_tiny --batch 1 --compile  # latency, torch.compile'd

``--compile`` times every model (zoo and baseline alike) through ``torch.compile`` (inductor, static shapes; the
warm-up forward compiles, ~1 minute a model), ``--batch`` replaces every pair's batch size (1: latency).

``--as-avx2`` builds the zoo kernels as an AVX2 CPU runs them and caps torch's own libraries (ATen, oneDNN,
MKL) at AVX2 too (benchmarks/cpu_isa_cap.py), so one AVX-512 machine also gives issue 12's AVX2 table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import zoo  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_isa_cap  # noqa: E402

# (zoo model, baseline model, batch, resolution)
PAIRS: List[Tuple[str, str, int, int]] = [
    ("vim_tiny_patch16_224", "deit_tiny_patch16_224", 8, 224),
    ("vim_small_patch16_224", "deit_small_patch16_224", 8, 224),
    ("msvmamba_nano", "convnext_atto", 8, 224),
    ("msvmamba_tiny", "convnext_tiny", 8, 224),
    ("vmamba_tiny", "convnext_tiny", 8, 224),
    ("mambavision_tiny", "convnext_tiny", 8, 224),
    ("vim_tiny_patch16_224", "deit_tiny_patch16_224", 2, 512),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_isa() -> str:
    try:
        from zoo.ops.mixer import cpu_isa
    except ImportError:  # a tree without the dispatched kernels
        return "n/a"
    isa = cpu_isa()
    try:
        from zoo.ops.mixer import cpu_intrinsics
    except ImportError:  # a tree from before the ZOO_CPU_INTRINSICS switch
        return isa
    return f"{isa} clones, hand-written paths: {cpu_intrinsics()}"


def kernel_threads() -> str:
    """Threads one parallel loop of the zoo CPU kernels runs on at the current torch.get_num_threads()."""
    try:
        from zoo.ops.mixer import cpu_parallel_threads
    except ImportError:  # a tree from before the kernels reported it
        return "n/a"
    return str(cpu_parallel_threads())


def build(name: str, res: int, compile: bool = False) -> torch.nn.Module:
    kwargs = {"img_size": res} if res != 224 else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return torch.compile(model, dynamic=False) if compile else model


def time_rounds(workloads: Dict[str, Tuple[torch.nn.Module, torch.Tensor]], rounds: int) -> Dict[str, List[float]]:
    """Seconds per forward of every workload, one forward of each per round."""
    times: Dict[str, List[float]] = {key: [] for key in workloads}
    with torch.inference_mode():
        for model, x in workloads.values():  # warm-up: kernel builds, allocator, oneDNN primitives
            model(x)
        for r in range(rounds):
            for key, (model, x) in workloads.items():
                start = time.perf_counter()
                model(x)
                times[key].append(time.perf_counter() - start)
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return times


def run(pairs: List[Tuple[str, str, int, int]], threads: int, rounds: int, compile: bool = False) -> None:
    torch.set_num_threads(threads)
    workloads = {}
    for zoo_name, base_name, batch, res in pairs:
        for name in (zoo_name, base_name):
            key = (name, batch, res)
            if key not in workloads:
                workloads[key] = (build(name, res, compile), torch.randn(batch, 3, res, res))
    times = time_rounds(workloads, rounds)
    ips = {key: key[1] / statistics.median(t) for key, t in times.items()}
    mode = "torch.compile" if compile else "eager"
    print(f"\n{threads} thread(s) (the zoo kernels' parallel loops use {kernel_threads()}), fp32, {mode}, median of "
          f"{rounds} interleaved rounds")
    print("| zoo model | res | batch | img/s | baseline | img/s | ratio | per round: median [quartiles] |")
    print("|---|---|---|---|---|---|---|---|")
    for zoo_name, base_name, batch, res in pairs:
        zoo_t, base_t = times[(zoo_name, batch, res)], times[(base_name, batch, res)]
        a, b = ips[(zoo_name, batch, res)], ips[(base_name, batch, res)]
        print(f"| {zoo_name} | {res} | {batch} | {a:.2f} | {base_name} | {b:.2f} | {a / b:.3f} | "
              f"{round_ratio_spread(zoo_t, base_t)} |")


def round_ratio_spread(zoo_times: List[float], base_times: List[float]) -> str:
    """The zoo / baseline ratio of each round (baseline seconds over zoo seconds), as median [lower, upper
    quartile]: the two forwards of a round ran seconds apart, so a load change that lasts a round cancels in its
    ratio, and the quartiles show how far the VM's noise moves the table's ratio."""
    ratios = sorted(b / z for z, b in zip(zoo_times, base_times))
    if len(ratios) < 2:
        return f"{ratios[0]:.3f}"
    lower, _, upper = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{statistics.median(ratios):.3f} [{lower:.3f}, {upper:.3f}]"


def run_table(pairs: List[Tuple[str, str, int, int]], thread_counts: List[int], rounds: int,
              compile: bool = False) -> None:
    """The header line, then one table per thread count."""
    print(f"torch {torch.__version__}, timm {timm.__version__}, CPU: {cpu_name()} ({os.cpu_count()} cores), "
          f"ATen ISA: {torch.backends.cpu.get_cpu_capability()}, zoo kernels: {kernel_isa()}, "
          f"scan backend: {zoo.ops.resolve_backend('cpu').name}, "
          f"oneDNN ISA cap: {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}, "
          f"MKL cap: {os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'none')}", flush=True)
    for threads in sorted(set(thread_counts)):
        run(pairs, threads, rounds, compile)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--only", default="", help="keep pairs whose zoo or baseline name contains this")
    p.add_argument("--pair", action="append", default=[], metavar="ZOO,BASELINE",
                   help="time this pair (batch 8, 224 px) instead of the table; repeatable")
    p.add_argument("--as-avx2", action="store_true",
                   help="run everything as on an AVX2 CPU (zoo kernels and torch's libraries; see the docstring)")
    p.add_argument("--batch", type=int, default=0, help="every pair's batch size instead of the table's (1: latency)")
    p.add_argument("--compile", action="store_true", help="time every model through torch.compile (inductor)")
    args = p.parse_args()
    if args.batch < 0:
        p.error(f"--batch takes a positive batch size (0 keeps the table's), got {args.batch}")
    if args.as_avx2:
        cpu_isa_cap.reexec_as_avx2()
        cpu_isa_cap.load_zoo_kernels_as_avx2()
    pairs = [pr for pr in PAIRS if args.only in pr[0] or args.only in pr[1]]
    if args.pair:
        names = [tuple(n.strip() for n in pr.split(",")) for pr in args.pair]
        bad = [pr for pr, n in zip(args.pair, names) if len(n) != 2 or not all(n)]
        if bad:
            p.error(f"--pair takes ZOO,BASELINE (two model names), got {bad}")
        pairs = [(zoo_name, base_name, 8, 224) for zoo_name, base_name in names]
    if not pairs:
        p.error(f"--only {args.only!r} matches no pair; names: {sorted({n for pr in PAIRS for n in pr[:2]})}")
    if args.batch:
        pairs = [(zoo_name, base_name, args.batch, res) for zoo_name, base_name, _, res in pairs]
    run_table(pairs, [int(t) for t in args.threads.split(",")], args.rounds, args.compile)


if __name__ == "__main__":
    main()
