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
    python benchmarks/bench_vlm.py --tiling --prefill --plot docs/vlm_tokens_latency.png  # the device run
    python benchmarks/bench_vlm.py --quick --tiling --prefill --plot /tmp/p.png           # CPU check, seconds

``--tiling`` times dynamic high-resolution tiling (4KHD rule: global view + tiles in one batched pass, 2x2 merge,
separators) of a 1344x896 image per model; ``--prefill`` times a LLaVA prefill (random small Llama, the
baseline tower) as is, with PyramidDrop and with encoder-side keep_tokens; ``--plot`` writes a PNG of visual
tokens vs encoder latency per family (drawn with PIL, no plotting library needed).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402,F401
from zoo.registry import get_family, list_test_models  # noqa: E402
from zoo.vlm import DynamicTiler, TiledEncoder, TileSeparators, ZooVisionTower  # noqa: E402

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


def time_call(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median ms of ``fn()`` (CUDA events on GPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_tiling(models: List[str], tile_for: Dict[str, int], hd_nums: List[int], args, device, dtype) -> List[Dict]:
    """4KHD tiling of one 1344x896 (3:2) image per model and hd_num: tokens and ms per image."""
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (896, 1344, 3), dtype=torch.uint8).numpy())
    rows = []
    for name in models:
        for hd_num in hd_nums:
            row = dict(model=name, family=family_of(name), tile=tile_for.get(name), hd_num=hd_num)
            try:
                torch.manual_seed(0)
                tower = ZooVisionTower(name, image_size=tile_for.get(name))
                tower.to(device=device, dtype=dtype)
                tiled = DynamicTiler(tower.image_processor, "4khd", hd_num=hd_num)(image)
                seps = TileSeparators(4 * tower.hidden_size).to(device=device, dtype=dtype)
                encoder = TiledEncoder(tower, merge=True, separators=seps)
                count = encoder([tiled]).counts[0]
                ms = time_call(lambda: encoder([tiled]), device, args.warmup, args.iters)
                row.update(grid="%dx%d" % tiled.grid, views=tiled.pixel_values.shape[0], tokens=count, ms=ms)
            except Exception as err:  # noqa: BLE001  (OOM etc.: reported, the run goes on)
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            rows.append(row)
            print(f"tiling {name} hd_num={hd_num}: {row.get('error') or row['tokens']}", file=sys.stderr, flush=True)
    return rows


def bench_prefill(args, device, dtype, quick: bool) -> List[Dict]:
    """LLaVA prefill (one forward over image + 32 text tokens): plain, PyramidDrop, encoder keep_tokens."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    from zoo.vlm.hf import ZooVisionConfig, llava_config
    from zoo.vlm.pyramid_drop import PyramidDrop

    tower, size, keep = ("test_vit", 64, 4) if quick else (BASELINE, 336, 144)
    width, layers = (32, 4) if quick else (1024, 8)
    text = LlamaConfig(vocab_size=1000, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                       num_attention_heads=4 if quick else 16, num_key_value_heads=4 if quick else 16)
    stages = (1, 2, 3) if quick else (2, 4, 6)
    rows = []
    for label, keep_tokens, drop in (("plain", None, False), ("PyramidDrop 0.5 @ %s" % (stages,), None, True),
                                     ("encoder keep_tokens=%d" % keep, keep, False)):
        torch.manual_seed(0)
        vision = ZooVisionConfig(architecture=tower, image_size=size, keep_tokens=keep_tokens)
        config = llava_config(vision, text, image_token_index=999)
        model = LlavaForConditionalGeneration(config).eval().to(device=device, dtype=dtype)
        if drop:
            PyramidDrop(model, layers=stages, keep_ratio=0.5)
        ids = torch.tensor([[1] + [999] * config.image_seq_length + list(range(2, 34))], device=device)
        ids = ids.expand(args.batch, -1)
        px = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
        ms = time_call(lambda: model(input_ids=ids, pixel_values=px), device, args.warmup, args.iters)
        rows.append(dict(config=label, image_tokens=config.image_seq_length, seq=ids.shape[1], ms=ms))
        print(f"prefill {label}: {ms:.2f} ms", file=sys.stderr, flush=True)
    return rows


def print_tiling(rows: List[Dict]) -> None:
    print("\n### Dynamic tiling (4KHD rule, 1344x896 image, 2x2 merge + separators)\n")
    print("| model | family | tile px | hd_num | grid | views | tokens | ms / image |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['family']} | {r['tile']} | {r['hd_num']} | failed: {r['error']} | | | |")
        else:
            print(f"| {r['model']} | {r['family']} | {r['tile']} | {r['hd_num']} | {r['grid']} | {r['views']} | "
                  f"{r['tokens']} | {r['ms']:.2f} |")


def print_prefill(rows: List[Dict]) -> None:
    base = rows[0]["ms"]
    print("\n### LLaVA prefill (random Llama, baseline tower)\n")
    print("| config | image tokens | sequence | ms | vs plain |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['image_tokens']} | {r['seq']} | {r['ms']:.2f} | {r['ms'] / base:.2f}x |")


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_plot(rows: List[Dict], path: str, title: str) -> None:
    """Log-log scatter of visual tokens vs encoder ms, one colour per family (lines join a model's sizes)."""
    from PIL import Image, ImageDraw

    pts = [r for r in rows if "ms" in r and r.get("tokens")]
    if not pts:
        raise SystemExit("no timed rows to plot")
    w, h, m = 900, 600, 70
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    lx = [math.log10(r["tokens"]) for r in pts]
    ly = [math.log10(r["ms"]) for r in pts]
    x0, x1 = min(lx) - 0.1, max(lx) + 0.1
    y0, y1 = min(ly) - 0.1, max(ly) + 0.1

    def xy(t, ms):
        return (m + (math.log10(t) - x0) / (x1 - x0) * (w - 2 * m - 200),
                h - m - (math.log10(ms) - y0) / (y1 - y0) * (h - 2 * m))

    draw.rectangle([m, m, w - m - 200, h - m], outline="black")
    for e in range(math.floor(x0), math.ceil(x1) + 1):
        if x0 <= e <= x1:
            x = xy(10 ** e, 10 ** y0)[0]
            draw.line([x, h - m, x, h - m + 5], fill="black")
            draw.text((x - 10, h - m + 8), f"{10 ** e:g}", fill="black")
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        if y0 <= e <= y1:
            y = xy(10 ** x0, 10 ** e)[1]
            draw.line([m - 5, y, m, y], fill="black")
            draw.text((m - 45, y - 5), f"{10 ** e:g}", fill="black")
    draw.text((w // 2 - 120, h - 30), "visual tokens per image (log)", fill="black")
    draw.text((10, 20), "encoder ms (log); " + title, fill="black")
    families = sorted({r["family"] for r in pts})
    for k, fam in enumerate(families):
        colour = PALETTE[k % len(PALETTE)]
        for model in sorted({r["model"] for r in pts if r["family"] == fam}):
            line = sorted((r["tokens"], r["ms"]) for r in pts if r["model"] == model)
            coords = [xy(t, ms) for t, ms in line]
            if len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            for cx, cy in coords:
                draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.rectangle([w - m - 180, m + 20 * k, w - m - 170, m + 20 * k + 10], fill=colour)
        draw.text((w - m - 165, m + 20 * k - 2), fam, fill="black")
    img.save(path)
    print(f"\nplot written to {path}", file=sys.stderr)


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
    p.add_argument("--quick", "--cpu", action="store_true",
                   help="seconds-long CPU check of every section: tiny models, one size, 1 warm-up, 2 iterations")
    p.add_argument("--tiling", action="store_true", help="also time dynamic 4KHD tiling per model")
    p.add_argument("--hd-num", nargs="+", type=int, default=None, help="4KHD hd_num values (default 9 25)")
    p.add_argument("--prefill", action="store_true", help="also time LLaVA prefill with/without PyramidDrop")
    p.add_argument("--plot", default=None, help="write a PNG of tokens vs encoder latency per family")
    args = p.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
        args.models = args.models or ["test_vit", "test_convnext"]
        args.sizes = args.sizes or [64]
        args.baseline = "test_vit"
        args.warmup, args.iters = 1, 2

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
    rows_tiling: List[Dict] = []
    if args.tiling:
        tiles = {m: (64 if args.quick or args.smoke else 336) for m in models}
        if not (args.quick or args.smoke):
            tiles.update({"convllava_large": 768, "vim_small_patch16_224": 224})
        rows_tiling = bench_tiling(models, tiles, args.hd_num or ([2, 4] if args.quick else [9, 25]), args,
                                   device, dtype)
        print_tiling(rows_tiling)
    if args.prefill:
        print_prefill(bench_prefill(args, device, dtype, quick=args.quick or args.smoke))
    if args.plot:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        tiled = [dict(r, model=r["model"] + " tiled", family=r["family"] + " (4KHD tiles)") for r in rows_tiling]
        write_plot(rows + tiled, args.plot, f"{name}, {dtype_name}, batch {args.batch}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(device), dtype=dtype_name, rows=rows), indent=1))


if __name__ == "__main__":
    main()
