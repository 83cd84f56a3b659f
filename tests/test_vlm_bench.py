"""benchmarks/bench_vlm.py runs end to end in its quick CPU mode (every section: towers, tiling, prefill, plot)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_vlm_quick_cpu_mode_runs_every_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_vlm", ROOT / "benchmarks" / "bench_vlm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plot = tmp_path / "tokens_latency.png"
    bench.main(["--quick", "--tiling", "--prefill", "--plot", str(plot), "--hd-num", "4"])
    out = capsys.readouterr().out
    assert "### VLM encoder latency" in out and "### Dynamic tiling" in out and "### LLaVA prefill" in out
    assert "failed" not in out
    # 4KHD at 64 px tiles (4x4 token grid, 2x2 merge -> 2x2): a 3:2 image with hd_num 4 -> 2x2 tiles, 27 tokens
    assert "| test_vit | vit (timm) | 64 | 4 | 2x2 | 5 | 27 |" in out
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == (900, 600)
