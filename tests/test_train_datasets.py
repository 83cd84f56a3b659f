"""Data formats through timm's dataset factory (issue 17): the tiny image set written as a Hugging Face
parquet dataset in the test trains through the script exactly like its ImageFolder copy."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from _train_data import as_flags, load_script, tiny_images, tiny_run_config, write_imagefolder

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_hf_parquet(root: Path) -> Path:
    """``root/train-00000-of-00001.parquet`` and ``validation-...``: image bytes + ClassLabel labels, the
    layout of the imagenet-1k parquet shards on the hub."""
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(3)])})
    root.mkdir(parents=True)
    for split, items in tiny_images().items():
        name = "train" if split == "train" else "validation"
        # the order ImageFolder lists write_imagefolder's files in (by class, then file name)
        items = [items[i] for i in sorted(range(len(items)), key=lambda i: (items[i][1], f"{i}.png"))]
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(img), "path": None} for img, _ in items], "label": [c for _, c in items]},
            features=features)
        ds.to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
    return root


def test_hf_parquet_dataset_trains_like_the_image_folder(tmp_path, capsys):
    folder = write_imagefolder(tmp_path / "folder")
    parquet = write_hf_parquet(tmp_path / "parquet")
    script = load_script()
    common = dict(ema=False)
    assert script.main(as_flags(tiny_run_config(folder, tmp_path / "out", "folder", **common))) == 0
    flags = as_flags(tiny_run_config(parquet, tmp_path / "out", "hf", **common))
    flags += ["--dataset", "hfds", "--val-split", "validation"]
    assert script.main(flags) == 0, capsys.readouterr().err
    ref = json.loads((tmp_path / "out" / "folder" / "summary.json").read_text())
    got = json.loads((tmp_path / "out" / "hf" / "summary.json").read_text())
    assert ref["final"]["val_top1"] >= 75.0  # 3 classes, chance 33%
    # throughput and memory reach the per-epoch summary and the JSON log
    assert got["final"]["img_per_s_per_device"] > 0 and got["peak_mem_mb"] > 0
    epochs = [json.loads(line) for line in (tmp_path / "out" / "hf" / "log.jsonl").read_text().splitlines()]
    assert all(r["peak_mem_mb"] > 0 for r in epochs if r["type"] == "epoch")
    # same pixels, same labels, same order: the same run
    assert got["final"]["val_top1"] == ref["final"]["val_top1"]
    assert got["final"]["train_loss"] == pytest.approx(ref["final"]["train_loss"], abs=1e-6)


def test_unknown_dataset_kind_and_missing_split_are_clear(tmp_path, capsys):
    parquet = write_hf_parquet(tmp_path / "parquet")
    script = load_script()
    code = script.main(as_flags(tiny_run_config(parquet, tmp_path / "out", None)) + ["--dataset", "tfrecords/x"])
    assert code == 2 and "'dataset'='tfrecords/x'" in capsys.readouterr().err
    code = script.main(as_flags(tiny_run_config(parquet, tmp_path / "out", None)) + ["--dataset", "hfds"])
    err = capsys.readouterr().err
    assert code == 2 and "split 'val'" in err and "Traceback" not in err
