"""Helpers of benchmarks/device_run.sh: the mixer timing, the bf16 training check, and the report.

    python benchmarks/device_report.py mixer --json OUT/mixer.json       # zoo vs mamba-ssm, Vim-Ti shapes
    python benchmarks/device_report.py train --steps 500 --json OUT/train.json
    python benchmarks/device_report.py report --dir OUT                  # OUT/result.json + OUT/result.md

``report`` merges whatever the run's steps left in ``--dir`` (the benchmarks write their JSON after
every row, so a step cut short by its timeout keeps what it measured) into the record schema of issue 11:
``{"device", "torch", "scan": [...], "mixer": [...], "models": [...]}`` plus the default kernel's
scan times, the test summaries, the training curve and the step log.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# Vim-Ti mixer shapes: (name, batch, d_inner, L, d_state)
MIXER_SHAPES = [("Vim-Ti 224 (B64 D384 L197 N16)", 64, 384, 197, 16),
                ("Vim-Ti 1248 (B8 D384 L6085 N16)", 8, 384, 6085, 16)]


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mixer_module_ms(batch: int, L: int, backend: str) -> float:
    """One Vim-Ti mixer (in_proj -> both directions -> out_proj), inference under fp16 autocast. On
    zoo's kernels under ZOO_CUDA_SCAN=lparallel this is the fused CUDA mixer; with ``mamba_ssm`` the
    same module runs its unfused path (conv, scan, gate per direction) on mamba-ssm's scan."""
    import os

    import torch

    from bench_scan import cuda_median_ms
    from zoo.models.vim import BiMambaMixer

    m = BiMambaMixer(192, d_state=16).cuda().eval()  # Vim-Ti: dim 192, d_inner 384
    x = torch.randn(batch, L, 192, device="cuda")
    old = os.environ.get("ZOO_SCAN_BACKEND")
    os.environ["ZOO_SCAN_BACKEND"] = backend
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            return cuda_median_ms(lambda: m(x), warmup=5, iters=15, reps=3)
    finally:
        if old is None:
            os.environ.pop("ZOO_SCAN_BACKEND")
        else:
            os.environ["ZOO_SCAN_BACKEND"] = old


def mixer(args) -> None:
    """Vim-Ti's mixer, both directions: the module on zoo's kernels vs on mamba-ssm's (adapter), and
    the bidirectional scan op's fwd+bwd (bf16) on each."""
    import torch

    import mamba_adapter
    from bench_scan import cuda_median_ms, make
    from zoo.ops import selective_scan_bidirectional

    have_mamba = mamba_adapter.enable()
    rows = []
    for name, batch, dim, L, N in MIXER_SHAPES:
        f, r = (make(batch, dim, L, N, 1, torch.bfloat16, "cuda", grad=True) for _ in range(2))
        dout = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
        keys = ("u", "delta", "A", "B", "C", "D", "bias")
        leaves = [f[k] for k in keys] + [r[k] for k in keys] + [f["z"]]

        def fwdbwd(backend):
            return lambda: torch.autograd.grad(selective_scan_bidirectional(
                *[f[k] for k in keys], *[r[k] for k in keys], z=f["z"], backend=backend), leaves, dout)

        row = dict(shape=name, zoo_ms=None, mamba_ms=None, zoo_fwdbwd_ms=None, mamba_fwdbwd_ms=None)
        rows.append(row)
        for side, backend in (("zoo", "compiled"), ("mamba", "mamba_ssm")):
            if side == "mamba" and not have_mamba:
                row["mamba_error"] = "mamba-ssm's selective_scan_cuda not available"
                continue
            try:
                row[f"{side}_ms"] = _mixer_module_ms(batch, L, backend)
                row[f"{side}_fwdbwd_ms"] = cuda_median_ms(fwdbwd(backend), warmup=3, iters=10, reps=2)
            except Exception as e:  # a failing side is recorded, the other still measured
                row[f"{side}_error"] = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            Path(args.json).write_text(json.dumps(rows, indent=1))  # after every timing: a timeout keeps them
        print(json.dumps(row), flush=True)


def train(args) -> None:
    """bf16-autocast training of Vim-Ti on synthetic data; the loss must stay finite."""
    import timm
    import torch

    import zoo  # noqa: F401

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=100, img_size=args.img_size).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=dev)
    target = torch.randint(0, 100, (args.batch,), device=dev)
    curve, t0 = [], time.time()
    for step in range(args.steps):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            value = loss.item()
            curve.append([step, value])
            Path(args.json).write_text(json.dumps(dict(model=args.model, batch=args.batch, steps=step + 1,
                                                       finite=all(math.isfinite(v) for _, v in curve),
                                                       seconds=time.time() - t0, curve=curve)))
            if not math.isfinite(value):
                break
    print(json.dumps(_load(Path(args.json))))


def _scan_rows(lpar: Optional[dict], default: Optional[dict]) -> List[dict]:
    by_shape: Dict[str, dict] = {}
    for r in (default or {}).get("rows", []) + (lpar or {}).get("rows", []):  # every shape, schema keys present
        by_shape[r["shape"]] = dict(shape=r["shape"], zoo_fwd_ms=None, mamba_fwd_ms=None, zoo_fwdbwd_ms=None,
                                    mamba_fwdbwd_ms=None)
    for r in (lpar or {}).get("rows", []):
        by_shape[r["shape"]] = dict(shape=r["shape"], zoo_fwd_ms=r.get("fwd_ms"), zoo_fwdbwd_ms=r.get("fwdbwd_ms"),
                                    mamba_fwd_ms=r.get("mamba_fwd_ms"), mamba_fwdbwd_ms=r.get("mamba_fwdbwd_ms"))
    for r in (default or {}).get("rows", []):
        row = by_shape.setdefault(r["shape"], dict(shape=r["shape"]))
        row.update(default_fwd_ms=r.get("fwd_ms"), default_fwdbwd_ms=r.get("fwdbwd_ms"))
        for k in ("mamba_fwd_ms", "mamba_fwdbwd_ms"):
            if row.get(k) is None:
                row[k] = r.get(k)
    return list(by_shape.values())


def _model_rows(zoo_rows: Optional[list], mamba_rows: Optional[list], default_rows: Optional[list]) -> List[dict]:
    """Issue 11's model rows; eager and compiled runs of a workload are separate rows."""
    def key(r):
        compiled = "" if r.get("compile", "eager") == "eager" else f" compiled ({r['compile']})"
        return r["model"], f"{r['mode']} {r['res']}px bs{r['batch']}{compiled}"

    out: Dict[tuple, dict] = {}
    for side, rows in (("zoo", zoo_rows), ("mamba", mamba_rows), ("default", default_rows)):
        for r in rows or []:
            row = out.setdefault(key(r), dict(model=key(r)[0], workload=key(r)[1], zoo_img_s=None, mamba_img_s=None,
                                              zoo_peak_gib=None, mamba_peak_gib=None))
            if "error" in r:
                row[f"{side}_error"] = r["error"]
            else:
                row[f"{side}_img_s"], row[f"{side}_peak_gib"] = r["img_s"], r["peak_gib"]
    return list(out.values())


def _rows(d: Path, *names: str) -> List[dict]:
    """The model rows of the eager and compiled runs of one side, whichever of them exist."""
    return [r for n in names for r in (_load(d / f"{n}.json") or [])]


def _tests(log: Path) -> Optional[str]:
    """pytest's summary line, or (a run cut short: no summary) the per-test outcomes counted from -v lines."""
    try:
        text = log.read_text()
    except OSError:
        return None
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if lines:
        return lines[-1].strip("= ")
    counts = {k: len(re.findall(rf"::\S+ {k.upper()}", text)) for k in ("passed", "failed", "error", "skipped")}
    done = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return f"cut short (no summary): {done or 'no test finished'}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def markdown(res: dict) -> str:
    lines = [f"## device run: {res['device']}, torch {res['torch']}, {res['date']}", ""]
    lines += [f"- tests (ZOO_CUDA_SCAN=lparallel): {_fmt(res['tests'].get('lparallel'))}",
              f"- tests (default kernel): {_fmt(res['tests'].get('default'))}", ""]
    lines += ["| scan shape | zoo fwd ms | mamba fwd ms | zoo/mamba | zoo fwd+bwd ms | mamba fwd+bwd ms | zoo/mamba "
              "| default fwd / fwd+bwd ms |", "|---|---|---|---|---|---|---|---|"]
    for r in res["scan"]:
        lines.append(f"| {r['shape']} | {_fmt(r.get('zoo_fwd_ms'))} | {_fmt(r.get('mamba_fwd_ms'))} | "
                     f"{_ratio(r.get('zoo_fwd_ms'), r.get('mamba_fwd_ms'))} | {_fmt(r.get('zoo_fwdbwd_ms'))} | "
                     f"{_fmt(r.get('mamba_fwdbwd_ms'))} | {_ratio(r.get('zoo_fwdbwd_ms'), r.get('mamba_fwdbwd_ms'))} | "
                     f"{_fmt(r.get('default_fwd_ms'))} / {_fmt(r.get('default_fwdbwd_ms'))} |")
    lines += ["", "| mixer (both directions) | zoo ms | mamba ms | zoo/mamba | zoo fwd+bwd ms | mamba fwd+bwd ms |",
              "|---|---|---|---|---|---|"]
    for r in res["mixer"]:
        lines.append(f"| {r['shape']} | {_fmt(r.get('zoo_ms'))} | {_fmt(r.get('mamba_ms'))} | "
                     f"{_ratio(r.get('zoo_ms'), r.get('mamba_ms'))} | {_fmt(r.get('zoo_fwdbwd_ms'))} | "
                     f"{_fmt(r.get('mamba_fwdbwd_ms'))} |")
    lines += ["", "| model | workload | zoo img/s | mamba img/s | zoo/mamba | zoo peak GiB | mamba peak GiB "
              "| default-kernel img/s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {r['workload']} | {_fmt(r.get('zoo_img_s'))} | {_fmt(r.get('mamba_img_s'))} | "
                     f"{_ratio(r.get('zoo_img_s'), r.get('mamba_img_s'))} | {_fmt(r.get('zoo_peak_gib'))} | "
                     f"{_fmt(r.get('mamba_peak_gib'))} | {_fmt(r.get('default_img_s'))} |")
    tr = res.get("train") or {}
    lines += ["", f"- bf16 training ({tr.get('model', '-')}, bs{tr.get('batch', '-')}): {tr.get('steps', 0)} steps, "
                  f"finite: {tr.get('finite', '-')}, loss curve (step, loss): {tr.get('curve', [])[::5]}",
              ""]
    sync = res.get("train_sync") or {}
    if sync.get("ms_per_step"):  # issue 17: the engine's step with a host sync every step vs every 50
        steps = ", ".join(f"every {n}: {ms:.2f} ms" for n, ms in sync["ms_per_step"].items())
        lines += [f"- engine step time ({sync.get('model')}, bs{sync.get('batch')}, {sync.get('amp')}), host sync "
                  f"{steps}", ""]
    lines += ["steps (name rc seconds):", "", "```", *res["steps"], "```", ""]
    return "\n".join(lines)


def report(args) -> None:
    d = Path(args.dir)
    meta = _load(d / "meta.json") or {}
    res = dict(
        device=meta.get("device", "unknown"), torch=meta.get("torch", "unknown"), date=time.strftime("%Y-%m-%d"),
        scan=_scan_rows(_load(d / "scan_lparallel.json"), _load(d / "scan_default.json")),
        mixer=_load(d / "mixer.json") or [],
        models=_model_rows(_rows(d, "models_lparallel", "models_lparallel_compiled"),
                           _rows(d, "models_mamba", "models_mamba_compiled"), _load(d / "models_default.json")),
        tests=dict(lparallel=_tests(d / "pytest_lparallel.log"), default=_tests(d / "pytest_default.log")),
        train=_load(d / "train.json"),
        train_sync=_load(d / "train_sync.json"),
        steps=(d / "steps.txt").read_text().splitlines() if (d / "steps.txt").exists() else [],
    )
    (d / "result.json").write_text(json.dumps(res, indent=1))
    # the name it is committed under: benchmarks/results/<yyyy-mm-dd>-<device>.json
    slug = re.sub(r"[^a-z0-9]+", "-", res["device"].lower()).strip("-")
    (d / f"{res['date']}-{slug}.json").write_text(json.dumps(res, indent=1))
    (d / "result.md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mixer")
    m.add_argument("--json", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", default="vim_tiny_patch16_224")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--img-size", type=int, default=224)
    t.add_argument("--json", required=True)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    args = ap.parse_args()
    {"mixer": mixer, "train": train, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
