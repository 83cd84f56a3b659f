"""Step time of the training engine with one host sync per step against one per log interval, one run.

``zoo.train.engine.train_one_epoch`` keeps the loss sums on the device and reads them (the only host sync)
every ``log_interval`` steps. With ``--log-intervals 1,50`` the same engine, model and batch run with a sync
after every step and with one every 50 steps, interleaved round by round; the table gives the median ms per
optimizer step of each and their ratio. On a GPU a per-step sync stalls the CPU until the step's kernels
have finished, so the next step's launches cannot overlap them; on the CPU the two should be equal.

    python benchmarks/bench_train_step.py --model vim_tiny_patch16_224 --batch 128     # a GPU machine
    python benchmarks/bench_train_step.py --model test_vim --img-size 32 --batch 16     # anywhere
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402

import zoo  # noqa: E402,F401
from zoo.train.engine import TrainState, train_one_epoch  # noqa: E402


def _one_epoch_ms(model, batch, steps: int, log_interval: int, device: torch.device, dtype) -> float:
    """ms per optimizer step of ``steps`` steps on one repeated batch (fresh optimizer state each call)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, updates_per_epoch=steps,
                                       step_on_epochs=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = TrainState()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    train_one_epoch(model, [batch] * steps, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler, state=state, steps=steps, accum_steps=1, device=device,
                    dtype=dtype, log_interval=log_interval)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per timed epoch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--log-intervals", default="1,50", help="comma-separated: steps between host syncs")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    intervals = [int(v) for v in args.log_intervals.split(",")]
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=100, img_size=args.img_size).to(device)
    batch = (torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 100, (args.batch,)))
    _one_epoch_ms(model, batch, min(args.steps, 5), intervals[0], device, dtype)  # warm-up: kernels, allocator
    times: Dict[int, List[float]] = {n: [] for n in intervals}
    for _ in range(args.rounds):
        for n in intervals:
            times[n].append(_one_epoch_ms(model, batch, args.steps, n, device, dtype))
    median = {n: statistics.median(t) for n, t in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} @{args.img_size}, batch {args.batch}, amp {args.amp}, {name}, torch {torch.__version__}; "
          f"median of {args.rounds} rounds of {args.steps} steps")
    print("| host sync every | ms / step | vs every step |")
    print("|---|---|---|")
    for n in intervals:
        print(f"| {n} step(s) | {median[n]:.2f} | {median[n] / median[intervals[0]]:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(dict(model=args.model, img_size=args.img_size, batch=args.batch,
                                             amp=args.amp, device=name, torch=torch.__version__,
                                             ms_per_step={str(n): median[n] for n in intervals})))


if __name__ == "__main__":
    main()
