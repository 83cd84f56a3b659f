"""Model throughput: zoo's Vim / MSVMamba (compiled scan kernels) next to timm's DeiT / ConvNeXt, one run.

Each workload reports images/s (median of CUDA-event timed iterations after warm-up, fp16 autocast)
and the peak GPU memory of that workload. Inference runs under ``torch.inference_mode``; the training
step is forward + backward + SGD step. DeiT uses timm's fused attention (SDPA).

    python benchmarks/bench_models.py                 # all workloads
    python benchmarks/bench_models.py --only vim      # Vim vs DeiT only
    python benchmarks/bench_models.py --cpu           # the CPU table instead (benchmarks/bench_cpu.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import zoo  # noqa: E402,F401
import bench_cpu  # noqa: E402  (same directory)
from bench_scan import cuda_median_ms  # noqa: E402  (same directory; the one CUDA-event timer)

# (group, label, model name, kwargs, mode, batch, resolution)
WORKLOADS = [
    ("vim", "Vim-Ti", "vim_tiny_patch16_224", {}, "train", 128, 224),
    ("vim", "DeiT-Ti", "deit_tiny_patch16_224", {}, "train", 128, 224),
    ("vim", "Vim-S", "vim_small_patch16_224", {}, "train", 128, 224),
    ("vim", "DeiT-S", "deit_small_patch16_224", {}, "train", 128, 224),
    ("msv", "MSVMamba-T", "msvmamba_tiny", {}, "train", 128, 224),
    ("msv", "ConvNeXt-T", "convnext_tiny", {}, "train", 128, 224),
    ("vim", "Vim-Ti", "vim_tiny_patch16_224", {}, "infer", 256, 224),
    ("vim", "DeiT-Ti", "deit_tiny_patch16_224", {}, "infer", 256, 224),
    ("vim", "Vim-Ti", "vim_tiny_patch16_224", {"img_size": 1248}, "infer", 8, 1248),
    ("vim", "DeiT-Ti", "deit_tiny_patch16_224", {"img_size": 1248}, "infer", 8, 1248),
    ("vim", "Vim-S", "vim_small_patch16_224", {}, "infer", 256, 224),
    ("vim", "DeiT-S", "deit_small_patch16_224", {}, "infer", 256, 224),
    ("vim", "Vim-S", "vim_small_patch16_224", {"img_size": 1248}, "infer", 8, 1248),
    ("vim", "DeiT-S", "deit_small_patch16_224", {"img_size": 1248}, "infer", 8, 1248),
    ("msv", "MSVMamba-N", "msvmamba_nano", {}, "infer", 256, 224),
    ("msv", "MSVMamba-M", "msvmamba_micro", {}, "infer", 256, 224),
    ("msv", "MSVMamba-T", "msvmamba_tiny", {}, "infer", 256, 224),
    ("msv", "ConvNeXt-T", "convnext_tiny", {}, "infer", 256, 224),
    ("msv", "MSVMamba-T", "msvmamba_tiny", {}, "infer", 8, 1024),
    ("msv", "ConvNeXt-T", "convnext_tiny", {}, "infer", 8, 1024),
]




def run_workload(name, kwargs, mode, batch, res, warmup, iters, compile_mode=None):
    torch.cuda.empty_cache()
    model = timm.create_model(name, pretrained=False, **kwargs).cuda()
    if compile_mode:
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, fullgraph=True)
    x = torch.randn(batch, 3, res, res, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        target = torch.randint(0, 1000, (batch,), device="cuda")
        scaler = torch.amp.GradScaler("cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    ms = cuda_median_ms(step, warmup, iters, reps=1)  # one whole step per CUDA-event sample
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    del model, x
    return batch / ms * 1e3, peak, ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["vim", "msv"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--labels", help="comma-separated model labels to run (default: all), e.g. Vim-Ti,DeiT-Ti")
    ap.add_argument("--backend", help="zoo scan backend; 'mamba_ssm' runs the same models on mamba-ssm's kernel "
                                      "(benchmarks/mamba_adapter.py)")
    ap.add_argument("--compile", dest="compile_mode", choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile(model, fullgraph=True) with this mode")
    ap.add_argument("--cpu", action="store_true", help="CPU inference table (fp32, 1 and all threads) instead")
    bench_cpu.add_arguments(ap)
    args = ap.parse_args()
    if args.cpu:
        prefix = {"vim": "vim", "msv": "msvmamba", None: ""}[args.only]
        pairs = [p for p in bench_cpu.PAIRS if p[0].startswith(prefix)]
        bench_cpu.run_table(pairs, [int(t) for t in args.threads.split(",")], args.rounds)
        return
    if not torch.cuda.is_available():
        ap.exit(2, "bench_models.py: no CUDA device is usable here (torch.cuda.is_available() is False; torch "
                   f"{torch.__version__}); these workloads are GPU ones. Run with --cpu for the CPU table.\n")
    from zoo.ops import resolve_backend

    if args.backend == "mamba_ssm":
        import mamba_adapter

        if not mamba_adapter.enable():
            sys.exit("mamba-ssm's selective_scan_cuda is neither importable nor buildable (set MAMBA_SSM_SRC)")
    if args.backend:
        os.environ["ZOO_SCAN_BACKEND"] = args.backend
    labels = set(args.labels.split(",")) if args.labels else None

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, scan backend: "
          f"{resolve_backend('cuda').name}", flush=True)
    rows = []
    for group, label, name, kwargs, mode, batch, res in WORKLOADS:
        if (args.only and group != args.only) or (labels and label not in labels):
            continue
        try:
            ips, peak, ms = run_workload(name, kwargs, mode, batch, res, args.warmup, args.iters, args.compile_mode)
            row = dict(model=label, mode=mode, batch=batch, res=res, img_s=ips, peak_gib=peak, ms=ms,
                       compile=args.compile_mode or "eager")
        except Exception as e:  # OOM or a model not there yet: report, keep going
            row = dict(model=label, mode=mode, batch=batch, res=res, error=str(e).splitlines()[0][:160])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row, so a run cut short by a timeout keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n| model | workload | img/s | peak GiB | ms/iter |\n|---|---|---|---|---|")
    for r in rows:
        wl = f"{r['mode']} {r['res']}px bs{r['batch']}"
        if "error" in r:
            print(f"| {r['model']} | {wl} | error: {r['error']} | | |")
        else:
            print(f"| {r['model']} | {wl} | {r['img_s']:.0f} | {r['peak_gib']:.2f} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
