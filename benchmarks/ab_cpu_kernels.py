"""The CPU kernels of two source trees, side by side in one process: every zoo_scan op call a model's
forward makes, replayed on the kernels of a base revision and of the working tree, alternately.

On a shared VM two runs of the same build differ by 20% or more, so separate processes cannot show a
5% change in a kernel. Here both trees' ``csrc/`` are built into libraries of their own (the op
namespaces renamed at compile time (rename_flags), both with the same flags), the calls a
forward makes are recorded once (a dispatch mode sees the op and its arguments), and each call is
timed on both libraries in turn, the order swapped every round. The table gives per op the median
over rounds of its summed time, the ratio head / base, and the largest output difference.

    python benchmarks/ab_cpu_kernels.py --base HEAD                  # working tree against HEAD
    python benchmarks/ab_cpu_kernels.py --base main~3 --models msvmamba_nano --rounds 21
    python benchmarks/ab_cpu_kernels.py --base HEAD --as-avx2   # both built as an AVX2 CPU runs them
    python benchmarks/ab_cpu_kernels.py --base HEAD --tiles     # the GEMM tiles also where MKL runs the layers
    perf record -e cpu-clock python benchmarks/ab_cpu_kernels.py --replay --models msvmamba_tiny
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zoo  # noqa: E402,F401
from bench_cpu import build, kernel_isa  # noqa: E402  (this folder, which python puts on sys.path)
from zoo.ops import _build, compiled  # noqa: E402

Call = Tuple[str, tuple, dict]  # (op name, args, kwargs)
_SCHEMA_LIBS: List[torch.library.Library] = []  # the renamed namespaces' schemas live as long as the process


class _Recorder(TorchDispatchMode):
    """Keeps every zoo_scan op call (name and arguments) made under it."""

    def __init__(self):
        super().__init__()
        self.calls: List[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "zoo_scan":
            self.calls.append((func._opname, args, kwargs))
        return func(*args, **kwargs)


def record_calls(model_name: str, batch: int, size: int) -> List[Call]:
    model = build(model_name, size)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)
        with _Recorder() as rec:
            model(x)
    return rec.calls


def _tree_csrc(rev: str, into: Path) -> Path:
    """csrc/ as it is at git revision `rev`, extracted under `into`."""
    out = into / "csrc"
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "csrc"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return out


def rename_flags(ns: str) -> List[str]:
    """Compile flags that give a second build of csrc/ namespaces of its own: its ops become ``<ns>::*`` and its
    zoo_vec helpers ``<ns>_vec``. Without the second, two libraries in one process shared the helpers' statics
    (GCC makes them unique symbols), so a build for another ISA took the first library's dispatch flags."""
    return [f"-Dzoo_scan={ns}", f"-Dzoo_vec={ns}_vec"]


def build_namespace(ns: str, csrc: Path, extra_cflags: List[str]) -> object:
    """csrc's CPU kernels as the ops torch.ops.<ns>.*: the zoo_scan schemas copied, the library built with
    the namespace renamed (and ``extra_cflags``). Built once per source content and flags, under the zoo
    extension cache."""
    lib = torch.library.Library(ns, "FRAGMENT")
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("zoo_scan::"):
            schema = str(getattr(torch.ops.zoo_scan, name.split("::")[1]).default._schema)
            if not schema.startswith("zoo_scan::cpu_"):  # the catch-all ops are defined by the library itself
                lib.define(schema.split("::", 1)[1])
    cflags, ldflags = _build.cpu_build_flags()
    cflags = cflags + extra_cflags + rename_flags(ns)
    sources = [csrc / s for s in _build.CPU_SOURCES]
    extra = " ".join(cflags).encode() + b"".join(Path(f).read_bytes() for f in extra_cflags if f.endswith(".h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(csrc.iterdir())) + extra).hexdigest()
    build_dir = _build._cache_root() / f"ab-{ns}-{digest[:12]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _build._cpp_extension().load(
        name=f"{ns}_cpu", sources=[str(s) for s in sources], extra_cflags=cflags,
        extra_ldflags=ldflags, extra_include_paths=[str(csrc)], build_directory=str(build_dir),
        is_python_module=False, verbose=False)
    _SCHEMA_LIBS.append(lib)
    return getattr(torch.ops, ns)


def _max_diff(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


def compare(calls: List[Call], libs: Dict[str, object], rounds: int) -> Dict[str, dict]:
    """Per op name: the per-round summed times on each library and the largest output difference."""
    names = list(libs)
    per_op: Dict[str, dict] = defaultdict(lambda: {n: [0.0] * rounds for n in names} | {"diff": 0.0, "calls": 0})
    for op, args, kwargs in calls:
        fns: Dict[str, Callable] = {n: getattr(lib, op).default for n, lib in libs.items()}
        outs = {n: f(*args, **kwargs) for n, f in fns.items()}  # a warm-up call each
        entry = per_op[op]
        entry["diff"] = max(entry["diff"], _max_diff(outs[names[0]], outs[names[1]]))
        entry["calls"] += 1
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                fns[n](*args, **kwargs)
                entry[n][r] += time.perf_counter() - start
    return per_op


def replay(calls: List[Call], rounds: int) -> Dict[str, float]:
    """Per op name: ms per forward (median over rounds) on the installed zoo_scan ops; for a profiler run
    (``perf record -e cpu-clock ... --replay``), where only the kernels of the working tree should run."""
    per_round: Dict[str, List[float]] = defaultdict(lambda: [0.0] * rounds)
    for op, args, kwargs in calls:
        fn = getattr(torch.ops.zoo_scan, op).default
        fn(*args, **kwargs)
        for r in range(rounds):
            start = time.perf_counter()
            fn(*args, **kwargs)
            per_round[op][r] += time.perf_counter() - start
    return {op: statistics.median(t) * 1e3 for op, t in per_round.items()}


def print_table(model: str, per_op: Dict[str, dict], base: str, head: str) -> None:
    print(f"\n{model}: ms per forward (median over rounds), head / base")
    print("| op | calls | base ms | head ms | head / base | max abs diff |\n|---|---|---|---|---|---|")
    totals = {base: [], head: []}
    rounds = len(next(iter(per_op.values()))[base]) if per_op else 0
    for r in range(rounds):
        for n in (base, head):
            totals[n].append(sum(e[n][r] for e in per_op.values()))
    rows = sorted(per_op.items(), key=lambda kv: -statistics.median(kv[1][base]))
    for op, e in rows + [("all", {base: totals[base], head: totals[head], "calls": "", "diff": None})]:
        b, h = statistics.median(e[base]) * 1e3, statistics.median(e[head]) * 1e3
        ratio = statistics.median(hh / bb for hh, bb in zip(e[head], e[base]))
        diff = "" if e["diff"] is None else f"{e['diff']:.2e}"
        print(f"| {op} | {e['calls']} | {b:.2f} | {h:.2f} | {ratio:.3f} | {diff} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision whose csrc/ is the base (default HEAD)")
    p.add_argument("--models", default="vim_tiny_patch16_224,msvmamba_nano",
                   help="comma-separated models; name@size@batch picks another input (default 224 px, batch 8)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replay", action="store_true",
                   help="no base: replay the calls on the package's own build only (to run under a profiler)")
    p.add_argument("--as-avx2", action="store_true",
                   help="build both trees (with --replay: the package) as an AVX2 CPU runs them "
                        "(zoo.ops._build.AS_AVX2_CFLAGS)")
    p.add_argument("--tiles", action="store_true",
                   help="record the forwards with every linear layer on grouped_linear's tiles, also on a CPU "
                        "where the models leave them to the BLAS (zoo.ops.mixer._tiles_beat_blas_gemm)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiles:  # the answers' caches, filled before the models ask
        from zoo.ops import mixer
        mixer._tiles_faster[:], mixer._blas_faster[:] = [True], [False]
    if args.replay and args.as_avx2:  # the package's kernels, as an AVX2 CPU runs them
        _build.load_cpu_variant(_build.AS_AVX2_CFLAGS)
    ok, why = compiled.kernels_available("cpu")
    if not ok:
        sys.exit(f"ab_cpu_kernels: the compiled CPU kernels are needed to record the calls: {why}")
    libs = {}
    if not args.replay:
        with tempfile.TemporaryDirectory() as tmp:
            extra = _build.AS_AVX2_CFLAGS if args.as_avx2 else []
            libs = {"base": build_namespace("zoo_ab_base", _tree_csrc(args.base, Path(tmp)), extra),
                    "head": build_namespace("zoo_ab_head", REPO / "csrc", extra)}
    what = "the package's build only" if args.replay else f"base = {args.base}, head = working tree"
    if args.as_avx2:
        what += ", both built as for an AVX2 CPU"
    print(f"torch {torch.__version__}, zoo kernels: {kernel_isa()}, {args.threads} thread(s), {what}, "
          f"{args.rounds} rounds")
    for spec in args.models.split(","):
        parts = spec.split("@")
        name, size, batch = parts[0], parts[1] if len(parts) > 1 else "224", parts[2] if len(parts) > 2 else "8"
        calls = record_calls(name, int(batch), int(size))
        if not calls:
            print(f"\n{name}: its forward calls no zoo_scan op here (nothing to compare)")
            continue
        with torch.inference_mode():  # as bench_cpu.py runs the models
            if args.replay:
                times = replay(calls, args.rounds)
                print(f"\n{name} @{size} bs{batch}: " + ", ".join(f"{op} {ms:.2f} ms" for op, ms in times.items()))
                continue
            per_op = compare(calls, libs, args.rounds)
        print_table(f"{name} @{size} bs{batch}", per_op, "base", "head")


if __name__ == "__main__":
    main()
