"""CPU inference throughput: MambaVision-T (compiled and reference scan) next to timm's ConvNeXt-T, one run.

fp32, ``torch.inference_mode``, one thread by default. The workloads are timed in interleaved rounds
(every round runs each workload once, in turn) so a load change on a shared machine hits all of them
alike; the table gives the median over rounds and the ratio to ConvNeXt-T measured in the same run.

    python benchmarks/bench_cpu_mambavision.py                  # bs 8, 224 px, 1 thread, 5 rounds
    python benchmarks/bench_cpu_mambavision.py --rounds 9 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import zoo  # noqa: E402,F401

BASELINE = "ConvNeXt-T"
# (label, model name, scan backend or None)
WORKLOADS = [
    ("MambaVision-T", "mambavision_tiny", "auto"),
    ("MambaVision-T (reference scan)", "mambavision_tiny", "reference"),
    (BASELINE, "convnext_tiny", None),
]


def _timed(model: torch.nn.Module, x: torch.Tensor, backend) -> float:
    if backend is not None:
        os.environ["ZOO_SCAN_BACKEND"] = backend
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.res, args.res)
    models = {name: timm.create_model(name).eval() for _, name, _ in WORKLOADS}
    compiled = zoo.ops.resolve_backend("cpu").name
    print(f"# CPU, {args.threads} thread(s), torch {torch.__version__}, timm {timm.__version__}, "
          f"auto scan backend: {compiled}; bs {args.batch}, {args.res} px, {args.rounds} rounds", flush=True)
    for label, name, backend in WORKLOADS:  # warm-up (and the JIT build of the compiled scan, if needed)
        _timed(models[name], x, backend)
    times = {label: [] for label, _, _ in WORKLOADS}
    for r in range(args.rounds):
        for label, name, backend in WORKLOADS:
            times[label].append(_timed(models[name], x, backend))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    os.environ.pop("ZOO_SCAN_BACKEND", None)

    base = statistics.median(times[BASELINE])
    rows = []
    print(f"\n| model | s/batch (median) | img/s | vs {BASELINE} |\n|---|---|---|---|")
    for label, name, backend in WORKLOADS:
        med = statistics.median(times[label])
        row = dict(model=label, name=name, backend=backend, s_per_batch=med, img_s=args.batch / med,
                   speed_vs_baseline=base / med)
        rows.append(row)
        print(f"| {label} | {med:.3f} | {row['img_s']:.2f} | {row['speed_vs_baseline']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
