"""benchmarks/bench_cpu.py: the per-round ratio column, and a table run end to end on test-sized models."""
from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_cpu():
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_round_ratios_are_baseline_seconds_over_zoo_seconds_with_quartiles():
    bench = _bench_cpu()
    zoo_s = [2.0, 1.0, 4.0, 2.0, 1.0]
    base_s = [1.0, 1.0, 1.0, 3.0, 2.0]  # per round: 0.5, 1.0, 0.25, 1.5, 2.0
    ratios = sorted(b / z for z, b in zip(zoo_s, base_s))
    # inclusive quartiles of five values: the 2nd and 4th of the sorted list
    assert bench.round_ratio_spread(zoo_s, base_s) == f"{statistics.median(ratios):.3f} [{ratios[1]:.3f}, {ratios[3]:.3f}]"
    assert bench.round_ratio_spread([2.0], [1.0]) == "0.500"


def test_table_prints_a_row_per_pair_with_its_round_ratios(capsys):
    bench = _bench_cpu()
    bench.run([("test_vim", "test_vit", 2, 32)], threads=1, rounds=3)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| test_vim |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    zoo_ips, base_ips, ratio = float(cells[3]), float(cells[5]), float(cells[6])
    assert cells[4] == "test_vit" and zoo_ips > 0 and base_ips > 0
    assert abs(ratio - zoo_ips / base_ips) < 2e-3 * ratio + 1e-3
    median, quartiles = cells[7].split(" ", 1)
    lower, upper = (float(v) for v in quartiles.strip("[]").split(","))
    assert lower <= float(median) <= upper


def test_compile_mode_times_compiled_models_and_says_so(capsys):
    import torch

    bench = _bench_cpu()
    model = bench.build("test_vim", 32, compile=True)
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():  # what the table times computes what the eager model does
        torch.testing.assert_close(model(x), model._orig_mod(x), rtol=1e-5, atol=1e-5)
    bench.run([("test_vim", "test_vit", 1, 32)], threads=1, rounds=1, compile=True)
    out = capsys.readouterr().out
    assert "fp32, torch.compile, median of 1" in out
    assert len([line for line in out.splitlines() if line.startswith("| test_vim | 32 | 1 |")]) == 1
