"""VLM vision-encoder latency and token count per family and resolution, against CLIP ViT-L/14-336.

For each model and input size the LLaVA-style tower (``zoo.vlm.ZooVisionTower``, random weights: latency does
not depend on them) encodes a batch; the table gives the visual tokens the LLM would receive, the encoder's
median latency, throughput and peak memory, and the latency ratio to the baseline users run today (timm's
``vit_large_patch14_clip_336``, LLaVA-1.5's tower, at the same size). ``--keep`` adds rows with FasterVLM-style
token reduction to that many tokens (the reduction's own cost included).

    python benchmarks/bench_vlm.py                       # GPU: 336/768/1024/1536 px, one model per family
    python benchmarks/bench_vlm.py --keep 576 --batch 4  # ... plus reduced-token rows
    python benchmarks/bench_vlm.py --smoke               # CPU smoke run: test variants, small sizes
    python benchmarks/bench_vlm.py --models convllava_large vim_small_patch16_224 --sizes 1536
    python benchmarks/bench_vlm.py --json out.json       # also write the rows as JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402,F401
from zoo.registry import get_family, list_test_models  # noqa: E402
from zoo.vlm import ZooVisionTower  # noqa: E402

BASELINE = "vit_large_patch14_clip_336"
# one representative per family (the size a VLM would use), baseline first
DEFAULT_MODELS = [
    BASELINE,
    "convllava_large",
    "vim_small_patch16_224",
    "msvmamba_tiny",
    "efficientvim_m4",
    "shvit_s4",
    "vitamin_large_336",
    "convnext_large_mlp",
]
DEFAULT_SIZES = [336, 768, 1024, 1536]


def family_of(name: str) -> str:
    try:
        return get_family(name)
    except ValueError:
        return "vit (timm)" if name.startswith(("vit_", "test_vit")) else "timm"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_tower(tower: ZooVisionTower, x: torch.Tensor, warmup: int, iters: int) -> List[float]:
    device = x.device
    with torch.inference_mode():
        for _ in range(warmup):
            tower(x)
        sync(device)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                tower(x)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                tower(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_one(name: str, size: int, keep: Optional[int], args, device: torch.device, dtype: torch.dtype) -> Dict:
    row = dict(model=name, family=family_of(name), size=size, keep=keep, batch=args.batch)
    tower = None
    try:
        torch.manual_seed(0)
        tower = ZooVisionTower(name, image_size=size, keep_tokens=keep)
        tower.to(device=device, dtype=dtype)
        row.update(tokens=tower.num_patches, hidden=tower.hidden_size, kind=tower.config.kind,
                   reduction=tower.config.reduction or "-",
                   params_m=sum(p.numel() for p in tower.parameters()) / 1e6)
        x = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_tower(tower, x, args.warmup, args.iters)
        ms = statistics.median(times)
        row.update(ms=ms, img_per_s=args.batch * 1e3 / ms)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as err:  # noqa: BLE001  (OOM, unsupported size: reported in the table, run goes on)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    finally:
        del tower
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows: List[Dict], device: torch.device, dtype: torch.dtype, args) -> None:
    base = {r["size"]: r.get("ms") for r in rows if r["model"] == args.baseline and r["keep"] is None}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n### VLM encoder latency ({name}, {str(dtype).replace('torch.', '')}, batch {args.batch}, "
          f"median of {args.iters} after {args.warmup} warm-up)\n")
    print("| model | family | px | kept | tokens | width | ms | img/s | peak GiB | vs baseline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['family']} | {r['size']} | {r['keep'] or '-'} | "
                  f"{r.get('tokens', '-')} | {r.get('hidden', '-')} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['ms'] / base[r['size']]:.2f}x" if base.get(r["size"]) else "-"
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        print(f"| {r['model']} | {r['family']} | {r['size']} | {r['keep'] or '-'} | {r['tokens']} | {r['hidden']} "
              f"| {r['ms']:.2f} | {r['img_per_s']:.1f} | {peak} | {ratio} |")
    print(f"\nbaseline: {args.baseline} at the same size; 'kept' rows reduce tokens with each family's "
          "training-free rule (FasterVLM [CLS] attention for ViTs, see docs/vlm.md).")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--keep", nargs="*", type=int, default=[], help="also time with keep_tokens=N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--smoke", action="store_true", help="CPU-sized run: test variants at 64/128 px")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        args.models = args.models or (["test_vit"] + list_test_models())
        args.sizes = args.sizes or [64, 128]
        args.baseline = "test_vit"
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)
    models = args.models or DEFAULT_MODELS
    sizes = args.sizes or DEFAULT_SIZES
    if args.baseline in models:
        models = [args.baseline] + [m for m in models if m != args.baseline]
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    rows = []
    for name in models:
        for size in sizes:
            full_tokens = None
            for keep in [None] + list(args.keep):
                if keep is not None and full_tokens is not None and keep >= full_tokens:
                    continue  # already at or under the budget: nothing to reduce
                row = bench_one(name, size, keep, args, device, dtype)
                if keep is None:
                    full_tokens = row.get("tokens")
                rows.append(row)
                status = row.get("error") or f"{row['ms']:.2f} ms, {row['tokens']} tokens"
                print(f"{name} @ {size}px keep={keep}: {status}", file=sys.stderr, flush=True)
    print_table(rows, device, dtype, args)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(device), dtype=dtype_name, rows=rows), indent=1))


if __name__ == "__main__":
    main()
