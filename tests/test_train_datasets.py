"""Data formats through timm's dataset factory (issue 17): the tiny image set written in the test as a Hugging
Face parquet dataset trains through the script exactly like its ImageFolder copy, and as WebDataset tar shards
(streamed, shuffled by timm's reader) to the folder run's accuracy band."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from _train_data import as_flags, load_script, tiny_images, tiny_run_config, write_imagefolder

datasets = pytest.importorskip("datasets")


pytestmark = pytest.mark.usefixtures("one_thread")


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


def write_wds_shards(root: Path) -> Path:
    """WebDataset shards: ``train-000000.tar``, ``train-000001.tar`` (24 samples each), ``val-000000.tar``;
    each sample is ``<key>.png`` + ``<key>.cls`` (the label as text)."""
    import tarfile

    root.mkdir(parents=True)
    for split, items in tiny_images().items():
        shards = [items[:24], items[24:]] if split == "train" else [items]
        for n, shard in enumerate(shards):
            with tarfile.open(root / f"{split}-{n:06d}.tar", "w") as tar:
                for i, (img, c) in enumerate(shard):
                    for ext, payload in (("png", _png(img)), ("cls", str(c).encode())):
                        info = tarfile.TarInfo(f"{split}{n}_{i:04d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return root


def test_webdataset_shards_train_to_the_folder_accuracy(tmp_path, capsys):
    """The same images as WebDataset tar shards, streamed through timm's reader (its own shuffling, so not
    the folder's order): the run reaches the accuracy band of the folder run (>= 75%, chance 33%)."""
    pytest.importorskip("webdataset")
    shards = write_wds_shards(tmp_path / "wds")
    folder = write_imagefolder(tmp_path / "folder")
    script = load_script()
    light = dict(ema=False, epochs=3, mixup=0.0, cutmix=0.0, reprob=0.0, aa=None)
    assert script.main(as_flags(tiny_run_config(folder, tmp_path / "out", "folder", **light))) == 0
    flags = as_flags(tiny_run_config(shards, tmp_path / "out", "wds", **light))
    flags += ["--dataset", "wds", "--num-classes", "3", "--train-split", "train-{000000..000001}.tar|48",
              "--val-split", "val-000000.tar|12"]
    assert script.main(flags) == 0, capsys.readouterr().err
    ref = json.loads((tmp_path / "out" / "folder" / "summary.json").read_text())
    got = json.loads((tmp_path / "out" / "wds" / "summary.json").read_text())
    assert got["global_steps"] == 18 and got["final"]["train_images"] == 48
    assert ref["final"]["val_top1"] >= 75.0 and got["final"]["val_top1"] >= 75.0, (ref["history"], got["history"])
    assert abs(got["final"]["val_top1"] - ref["final"]["val_top1"]) <= 100.0 * 2 / 12  # within 2 of 12 images
    assert got["final"]["train_loss"] < got["history"][0]["train_loss"]


_KILL = """
import json, os, signal, sys
from zoo.train import make_config, run
def hook(info):
    if info["global_step"] == 9:
        os.kill(os.getpid(), signal.SIGKILL)
run(make_config(json.loads(sys.argv[1])), on_step=hook)
"""


def test_webdataset_run_resumes_mid_epoch(tmp_path):
    """A streamed run killed after step 9 (checkpoint at step 8, mid epoch 2) resumes by replaying epoch 2's
    stream (timm reshuffles by seed and epoch) and skipping its first 2 steps: 18 steps in all, and epoch 2's
    train loss still covers its 48 images."""
    import signal
    import subprocess

    from _train_data import PYTHON, subprocess_env
    from zoo.train import make_config, run

    pytest.importorskip("webdataset")
    shards = write_wds_shards(tmp_path / "wds")
    values = tiny_run_config(shards, tmp_path, "wds", ema=False, epochs=3, save_every_steps=4, dataset="wds",
                             num_classes=3, train_split="train-{000000..000001}.tar|48",
                             val_split="val-000000.tar|12")
    proc = subprocess.run([PYTHON, "-c", _KILL, json.dumps(values)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = run(make_config(dict(values, resume="auto")))
    assert resumed["global_steps"] == 18
    assert [h["train_images"] for h in resumed["history"]] == [48, 48, 48]
