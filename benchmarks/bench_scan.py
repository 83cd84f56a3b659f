"""Selective-scan timings: zoo's compiled kernels vs mamba-ssm's selective_scan_fn (when importable).

Prints a markdown table of forward and forward+backward times (median of CUDA-event timings after
warm-up), the achieved bandwidth (the fewest bytes the pass must move: each input read once, each
output written once, over the time) and the ratio to mamba-ssm. ``--cpu`` times the compiled CPU op
against the reference backend (``selective_scan_reference``, the fallback users get without the kernels).

    python benchmarks/bench_scan.py                 # GPU table
    python benchmarks/bench_scan.py --cpu           # CPU: compiled op vs the reference backend, fwd and fwd+bwd
    MAMBA_SSM_SRC=/path/to/mamba_ssm-x.y  python benchmarks/bench_scan.py   # also builds mamba's kernel
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
import zoo  # noqa: E402,F401
from zoo.ops import compiled, selective_scan_reference  # noqa: E402

# (name, batch, dim, L, d_state, groups)
SHAPES = [
    ("Vim-Ti 224 (B64 D384 L197 N16)", 64, 384, 197, 16, 1),
    ("Vim-Ti 1248 (B8 D384 L6085 N16)", 8, 384, 6085, 16, 1),
    ("MSVMamba-T stage1 4 dirs (B32 D768 L3136 N1 G4)", 32, 768, 3136, 1, 4),
    ("long L (B1 D64 L65536 N16)", 1, 64, 65536, 16, 1),
]


def load_mamba():
    """mamba-ssm's selective_scan_cuda extension: importable, or JIT-built from $MAMBA_SSM_SRC."""
    try:
        import selective_scan_cuda  # type: ignore

        return selective_scan_cuda
    except ImportError:
        pass
    src = os.environ.get("MAMBA_SSM_SRC")
    if not src:
        return None
    from torch.utils.cpp_extension import load

    d = Path(src) / "csrc" / "selective_scan"
    sources = [str(d / "selective_scan.cpp")] + sorted(str(p) for p in d.glob("*.cu"))
    flags = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
             "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
             "-gencode=arch=compute_90,code=sm_90"]
    build = Path(os.environ.get("MAMBA_BUILD_DIR", "/tmp/mamba_build"))
    build.mkdir(parents=True, exist_ok=True)
    return load("selective_scan_cuda", sources, extra_cflags=["-O3"], extra_cuda_cflags=flags,
                extra_include_paths=[str(d)], build_directory=str(build), verbose=False)


class MambaScan(torch.autograd.Function):
    """Calls mamba-ssm's extension the way its selective_scan_fn does (z gate, softplus)."""

    @staticmethod
    def forward(ctx, ext, u, delta, A, B, C, D, z, bias):
        out, x, *rest = ext.fwd(u, delta, A, B, C, D, z, bias, True)
        ctx.ext = ext
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, x, out)
        return rest[0]

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, dz = ctx.ext.bwd(u, delta, A, B, C, D, z, bias, dout.contiguous(),
                                                            x, out, None, True, False)[:8]
        return None, du, ddelta, dA, dB, dC, dD, dz, dbias


def cuda_median_ms(fn, warmup=10, iters=30, reps=5):
    """Median over ``iters`` samples of the mean time of ``reps`` back-to-back calls (CUDA events).

    Back-to-back calls keep the GPU busy between launches (no host sync inside a sample), so short
    kernels are not timed at idle clocks or with launch gaps.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / reps)
    return statistics.median(times)


def make(batch, dim, L, N, groups, dtype, device, grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    t = dict(
        u=r(batch, dim, L).to(dtype), delta=(0.5 * r(batch, dim, L) - 2).to(dtype),
        A=-torch.rand(dim, N, device=device, generator=g) - 0.5, B=r(batch, groups, N, L).to(dtype),
        C=r(batch, groups, N, L).to(dtype), D=r(dim), z=r(batch, dim, L).to(dtype), bias=0.1 * r(dim),
    )
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def scan_bytes(batch, dim, L, N, groups, elt, backward):
    act = batch * dim * L * elt
    bc = batch * groups * N * L * elt
    fwd = 3 * act + 2 * bc + act  # u, delta, z, B, C in; out
    if not backward:
        return fwd
    return fwd + (4 * act + 2 * bc) + (3 * act + 2 * bc)  # bwd reads u, delta, z, dout, B, C; writes du, ddelta, dz, dB, dC


def gpu_table(args):
    dev = "cuda"
    ok, why = compiled.kernels_available(dev)
    if not ok:
        sys.exit(f"compiled CUDA kernels unavailable: {why}")
    mamba = None
    if not args.no_mamba:
        try:
            t0 = time.time()
            mamba = load_mamba()
            if mamba is not None:
                print(f"# mamba-ssm selective_scan_cuda ready ({time.time() - t0:.0f} s)")
        except Exception as e:  # a failed baseline build must not hide our numbers
            print(f"# mamba-ssm build failed: {str(e).splitlines()[-1] if str(e) else e}")
    dtype = torch.bfloat16
    rows = []
    for name, batch, dim, L, N, groups in SHAPES:
        if args.quick and L > 10000:
            continue
        t = make(batch, dim, L, N, groups, dtype, dev, grad=True)
        ours = lambda: torch.ops.zoo_scan.scan_fwd(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],  # noqa: E731
                                                   t["bias"], True, False)[0]
        with torch.no_grad():
            f_ms = cuda_median_ms(ours)
        dout = torch.randn(batch, dim, L, device=dev, dtype=dtype)
        leaves = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")]

        def fb(fn):
            def run():
                y = fn()
                torch.autograd.grad(y, leaves, dout)
            return run

        fb_ms = cuda_median_ms(fb(ours), warmup=5, iters=15, reps=3)
        row = dict(shape=name, fwd_ms=f_ms, fwdbwd_ms=fb_ms,
                   fwd_gbs=scan_bytes(batch, dim, L, N, groups, 2, False) / f_ms / 1e6,
                   fwdbwd_gbs=scan_bytes(batch, dim, L, N, groups, 2, True) / fb_ms / 1e6)
        if mamba is not None:
            m = lambda: MambaScan.apply(mamba, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],  # noqa: E731
                                        t["bias"])
            with torch.no_grad():
                row["mamba_fwd_ms"] = cuda_median_ms(m)
            row["mamba_fwdbwd_ms"] = cuda_median_ms(fb(m), warmup=5, iters=15, reps=3)
            with torch.no_grad():
                ref, our = m().float(), ours().float()
            row["rel_err_vs_mamba"] = ((ref - our).norm() / ref.norm()).item()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every shape, so a run cut short by a timeout keeps what it measured
            Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    # fused two-direction scan vs two separate launches (Vim-Ti shape)
    _, batch, dim, L, N, groups = SHAPES[0]
    f, r = make(batch, dim, L, N, groups, dtype, dev), make(batch, dim, L, N, groups, dtype, dev)
    fused = lambda: torch.ops.zoo_scan.bidir_fwd(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], f["bias"],  # noqa: E731
                                                 r["u"], r["delta"], r["A"], r["B"], r["C"], r["D"], r["bias"],
                                                 f["z"], True, 0.5)

    def two():
        y = torch.ops.zoo_scan.scan_fwd(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], None, f["bias"], True, False)[0]
        y2 = torch.ops.zoo_scan.scan_fwd(r["u"], r["delta"], r["A"], r["B"], r["C"], r["D"], None, r["bias"], True, True)[0]
        return (y + y2) * 0.5 * torch.nn.functional.silu(f["z"])

    with torch.no_grad():
        bi = dict(shape="Vim-Ti bidirectional fwd", fused_ms=cuda_median_ms(fused), two_scans_ms=cuda_median_ms(two))
    print(json.dumps(bi), flush=True)

    print(f"\n### selective scan, {torch.cuda.get_device_name()}, bf16 in / fp32 state, median ms (CUDA events)\n")
    print("| shape | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | mamba fwd ms | mamba fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r_ in rows:
        mf, mb = r_.get("mamba_fwd_ms"), r_.get("mamba_fwdbwd_ms")
        fwd, fb = r_["fwd_ms"], r_["fwdbwd_ms"]
        cells = [r_["shape"], f"{fwd:.4f}", f"{r_['fwd_gbs']:.0f}", f"{fb:.4f}", f"{r_['fwdbwd_gbs']:.0f}",
                 "-" if mf is None else f"{mf:.4f}", "-" if mb is None else f"{mb:.4f}",
                 "-" if mf is None else f"{mf / fwd:.2f}x", "-" if mb is None else f"{mb / fb:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nfused bidirectional fwd (Vim-Ti shape): {bi['fused_ms']:.4f} ms vs two scans + gate {bi['two_scans_ms']:.4f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows, bidir=bi), indent=1))


# (name, batch, dim, L, d_state, groups) for the CPU table; small enough for the per-token loop
CPU_SHAPES = [
    ("B2 D64 L256 N16", 2, 64, 256, 16, 1),
    ("B1 D192 L197 N16", 1, 192, 197, 16, 1),
    ("Vim-Ti (B8 D384 L197 N16)", 8, 384, 197, 16, 1),
    ("MSVMamba nano-like (B2 D192 L1024 N1 G4)", 2, 192, 1024, 1, 4),
]


def cpu_times_ms(fn, n, warmup=2):
    """(median, relative spread) of ``n`` timed calls after ``warmup`` untimed ones; the spread is the
    interquartile range over the median, to show whether the median is stable on a busy machine."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - s) * 1e3)
    q1, _, q3 = statistics.quantiles(ts, n=4)
    med = statistics.median(ts)
    return med, (q3 - q1) / med


def cpu_table(args):
    if args.lib:  # time a given build (e.g. an older source's cached library) instead of csrc/
        torch.ops.load_library(args.lib)
    else:
        ok, why = compiled.kernels_available("cpu")
        if not ok:
            sys.exit(f"compiled CPU kernels unavailable: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, batch, dim, L, N, groups in CPU_SHAPES:
        t = make(batch, dim, L, N, groups, torch.float32, "cpu", grad=True)
        leaves = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")]
        dout = torch.randn(batch, dim, L)

        def ours():
            return torch.ops.zoo_scan.scan_fwd(*leaves, True, False)[0]

        def reference():  # the library's own fallback, what a user gets without the kernels
            return selective_scan_reference(*leaves, True)

        def fb(fn):
            return lambda: torch.autograd.grad(fn(), leaves, dout)

        row = {"shape": f"{name} fp32"}
        for label, fn, n in (("fwd", ours, args.iters), ("ref_fwd", reference, args.ref_iters)):
            with torch.no_grad():
                row[label], row[label + "_spread"] = cpu_times_ms(fn, n)
        for label, fn, n in (("fwdbwd", fb(ours), args.iters), ("ref_fwdbwd", fb(reference), args.ref_iters)):
            row[label], row[label + "_spread"] = cpu_times_ms(fn, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n### CPU ({torch.get_num_threads()} threads): compiled op vs the reference backend "
          f"(selective_scan_reference), median ms of {args.iters} / {args.ref_iters} calls (IQR / median)\n")
    print("| shape | reference fwd | compiled fwd | fwd speed-up | reference fwd+bwd | compiled fwd+bwd | "
          "fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda k: f"{r[k]:.2f} ({r[k + '_spread']:.0%})"  # noqa: E731
        print(f"| {r['shape']} | {cell('ref_fwd')} | {cell('fwd')} | {r['ref_fwd'] / r['fwd']:.1f}x | "
              f"{cell('ref_fwdbwd')} | {cell('fwdbwd')} | {r['ref_fwdbwd'] / r['fwdbwd']:.1f}x |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the very long sequences")
    ap.add_argument("--no-mamba", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--lib", help="--cpu: load this built zoo_scan CPU library instead of building csrc/")
    ap.add_argument("--threads", type=int, default=0, help="--cpu: torch.set_num_threads (default: torch's)")
    ap.add_argument("--iters", type=int, default=20, help="--cpu: timed calls per median (compiled op)")
    ap.add_argument("--ref-iters", type=int, default=9, help="--cpu: timed calls per median (reference)")
    a = ap.parse_args()
    cpu_table(a) if a.cpu else gpu_table(a)
