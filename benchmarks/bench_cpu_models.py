"""CPU inference throughput of zoo models against timm's ConvNeXt-T, measured in the same run.

Models run one after another inside each round (interleaved), so drifting machine load hits every
model alike; the table gives the median images/s over rounds and the ratio to the baseline's median.
Inference under ``torch.inference_mode``, fp32, a fixed thread count (1 by default).

    python benchmarks/bench_cpu_models.py                     # vmamba_tiny, mambavision_tiny vs convnext_tiny
    python benchmarks/bench_cpu_models.py --models vmamba_tiny vmamba_v0_tiny msvmamba_tiny --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import zoo  # noqa: E402,F401  (registers the zoo models)

BASELINE = "convnext_tiny"


def _seconds_per_batch(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmamba_tiny", "mambavision_tiny"], help="zoo or timm model names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one batch per model per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be >= 1")

    torch.set_num_threads(args.threads)
    names = [BASELINE] + [m for m in args.models if m != BASELINE]
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    times: Dict[str, List[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for r in range(args.warmup + args.rounds):
            for name in names:
                seconds = _seconds_per_batch(models[name], x)
                if r >= args.warmup:
                    times[name].append(seconds)
            print(f"round {r + 1}/{args.warmup + args.rounds} done", file=sys.stderr, flush=True)

    base = statistics.median(times[BASELINE])
    print(f"CPU inference, batch {args.batch}, {args.size} px, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds; backend {zoo.ops.resolve_backend('cpu').name}")
    print(f"| model | params (M) | ms / batch | images/s | throughput vs {BASELINE} |")
    print("|---|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(f"| {name} | {params:.1f} | {med * 1e3:.0f} | {args.batch / med:.2f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
