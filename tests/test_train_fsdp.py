"""FSDP2 training (``--fsdp``): 2 gloo processes against DDP, sharded checkpoints that resume on another world
size, and the row assembly of the shard reader against whole tensors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import zoo  # noqa: F401
from _train_data import KILL_SCRIPT, subprocess_env, tiny_run_config, write_imagefolder
from zoo.train import ConfigError, make_config, run
from zoo.train import checkpoint as ckpt_io
from zoo.train import fsdp

pytestmark = pytest.mark.slow

# per-sample augmentation seeds make the runs independent of how the batch is split over processes
COMMON = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.0, mixup=0.0, cutmix=0.0, device="cpu")

# one launch runs DDP and then FSDP in the same process group (saves a second torchrun start)
_DDP_THEN_FSDP = textwrap.dedent("""
    import json, sys
    from zoo.train import make_config, run
    from zoo.train.distributed import cleanup
    for values in json.loads(sys.argv[1]):
        run(make_config(values))
    cleanup()
""")

@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("fsdpfolder"))


def _torchrun(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = cwd / "launch.py"  # torchrun runs a script file
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path),
           *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _whole(run_folder: Path, prefix: str = "model.") -> dict:
    """The weights of a run's last.pth, sharded or not, as whole tensors."""
    path = run_folder / "last.pth"
    ckpt = ckpt_io.load_training_checkpoint(path)
    return fsdp.whole_tensors(ckpt_io.weights_source(ckpt, path), prefix)


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_two_processes_match_ddp_and_the_sharded_checkpoint_reads_back(tmp_path, tiny_imagefolder):
    """2 gloo processes x batch 4, 12 AdamW steps with EMA: FSDP2 ends within 1e-5 of DDP on every weight, EMA
    weight and Adam moment, with the same validation numbers. Its last.pth names a folder of one shard file per
    rank (weights_only-loadable); --eval and --finetune read the whole weights back in one process."""
    ddp = tiny_run_config(tiny_imagefolder, tmp_path, "ddp", **COMMON)
    sharded = tiny_run_config(tiny_imagefolder, tmp_path, "fsdp", fsdp=True, **COMMON)
    proc = _torchrun(_DDP_THEN_FSDP, json.dumps([ddp, sharded]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for prefix in ("model.", "model_ema."):
        worst = _worst(_whole(tmp_path / "ddp", prefix), _whole(tmp_path / "fsdp", prefix))
        print(f"FSDP vs DDP, {prefix}*: max |difference| {worst:.2e}")
        assert worst < 1e-5, (prefix, worst)
    ddp_adam = _whole(tmp_path / "ddp", "optimizer.")
    assert any(k.endswith("exp_avg_sq") for k in ddp_adam)
    assert _worst(ddp_adam, _whole(tmp_path / "fsdp", "optimizer.")) < 1e-7
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("ddp", "fsdp")]
    for a, b in zip(summaries[0]["history"], summaries[1]["history"]):
        assert a["val_top1"] == b["val_top1"] and a.get("ema_top1") == b.get("ema_top1")
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["train_loss"] - b["train_loss"]) < 1e-4

    last = torch.load(tmp_path / "fsdp" / "last.pth", weights_only=True)
    assert "model" not in last and last["shards"]["world_size"] == 2
    folders = [p.name for p in (tmp_path / "fsdp").glob("last.shards-*")]
    assert folders == [last["shards"]["folder"]]  # the older checkpoints' folders were removed
    for shard in (tmp_path / "fsdp" / folders[0]).iterdir():
        torch.load(shard, weights_only=True)
    best = [torch.load(tmp_path / name / "best.pth", weights_only=True) for name in ("fsdp", "ddp")]
    assert best[0]["epoch"] == best[1]["epoch"]
    assert _worst(best[0]["model"], best[1]["model"]) < 1e-5  # gathered from the shards: whole weights

    evaluated = run(make_config(dict(sharded, eval_only=True, resume=str(tmp_path / "fsdp" / "last.pth"))))
    final = summaries[1]["history"][-1]
    assert evaluated["top1"] == final["val_top1"] and abs(evaluated["loss"] - final["val_loss"]) < 1e-5
    assert evaluated["ema_top1"] == final["ema_top1"]
    model = timm.create_model("test_vim", num_classes=3, img_size=16)
    report = ckpt_io.load_finetune_weights(model, tmp_path / "fsdp" / "last.pth")
    assert not report["missing"] and not report["unexpected"]
    assert _worst(model.state_dict(), _whole(tmp_path / "ddp")) < 1e-5


def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path, tiny_imagefolder):
    """2 FSDP processes SIGKILLed after step 9 leave the step-8 checkpoint in 2 shards; one process resumes it
    (FSDP on a world of 1: every row now comes from both files) and ends where the uninterrupted one-process
    run ends, within 1e-5, with the same epoch loss (the partial sum in the checkpoint covers both ranks)."""
    ref = run(make_config(tiny_run_config(tiny_imagefolder, tmp_path, "straight", **COMMON)))
    values = tiny_run_config(tiny_imagefolder, tmp_path, "killed", fsdp=True, save_every_steps=4, **COMMON)
    proc = _torchrun(KILL_SCRIPT, json.dumps(values), "9", cwd=tmp_path)
    assert proc.returncode != 0 and "SIGKILL" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)
    assert (ckpt["global_step"], ckpt["shards"]["world_size"]) == (8, 2)

    resumed = run(make_config(dict(values, resume="auto")))
    assert resumed["global_steps"] == 12
    for prefix in ("model.", "model_ema."):
        assert _worst(_whole(tmp_path / "straight", prefix), _whole(tmp_path / "killed", prefix)) < 1e-5, prefix
    assert torch.load(tmp_path / "killed" / "last.pth", weights_only=True)["shards"]["world_size"] == 1
    assert abs(resumed["history"][-1]["train_loss"] - ref["history"][-1]["train_loss"]) < 1e-5


# --- the shard reader and the loaders, in one process -------------------------------------------------
def _write_pieces(folder: Path, full: dict, cuts: list) -> None:
    """``full`` split into row ranges at ``cuts`` (one file per range), as ``save_shards`` lays them out."""
    folder.mkdir()
    bounds = list(zip(cuts[:-1], cuts[1:]))
    for rank, (start, stop) in enumerate(bounds):
        pieces = {k: (v[start:stop] if v.ndim else v).clone() for k, v in full.items()}
        torch.save({"tensors": pieces, "offsets": {k: (start if v.ndim else 0) for k, v in full.items()},
                    "shapes": {k: list(v.shape) for k, v in full.items()}},
                   folder / f"rank{rank:05d}-of-{len(bounds):05d}.pth")


def test_shard_reader_assembles_any_row_range(tmp_path):
    """Pieces of uneven size, empty pieces (FSDP's last ranks when rows < world size) and 0-d tensors: every
    row range read from the files equals the same slice of the whole tensor."""
    gen = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(7, 3, generator=gen), "b": torch.randn(7, generator=gen), "step": torch.tensor(5.0)}
    _write_pieces(tmp_path / "s", full, [0, 3, 3, 6, 7, 7])
    source = fsdp.ShardedSource(tmp_path / "s", 5)
    assert source.shape("w") == (7, 3) and source.shape("step") == ()
    for start in range(8):
        for stop in range(start, 8):
            assert torch.equal(source.rows("w", start, stop), full["w"][start:stop])
            assert torch.equal(source.rows("b", start, stop), full["b"][start:stop])
    assert torch.equal(source.rows("step", 0, 1), full["step"])
    (tmp_path / "s" / "rank00003-of-00005.pth").unlink()
    with pytest.raises(ConfigError, match=r"s is incomplete: 1 of 5 shard files missing .*rank00003-of-00005"):
        fsdp.ShardedSource(tmp_path / "s", 5)


def test_module_and_optimizer_state_round_trip_through_the_loaders(tmp_path):
    """An AdamW state and the weights split into shard files and loaded into a fresh model and optimizer give
    the same next step as the original; a checkpoint of another model names the keys that do not fit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(6, 4)
    for _ in range(3):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    plain, tensors = fsdp.split_optimizer_state(opt.state_dict())
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    _write_pieces(tmp_path / "s", tensors, [0, 2, 5, 9])
    source = fsdp.ShardedSource(tmp_path / "s", 3)

    fresh = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fsdp.load_module(fresh, source, "model.", tmp_path, "test checkpoint")
    fsdp.load_optimizer(fresh_opt, plain, source)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    with pytest.raises(ConfigError, match=r"does not fit model Sequential: 5 of another shape \(first: \[.0.weight \(5, 4\) vs \(6, 4\)"):
        fsdp.load_module(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), source, "model.",
                         tmp_path, "test checkpoint")


@pytest.mark.parametrize("name, blocks", [("test_vim", 3), ("convnext_atto", 12), ("test_mambavision", 6),
                                          ("vit_tiny_patch16_224", 12)])
def test_fsdp_units_are_the_repeated_blocks(name, blocks):
    """One FSDP unit per block of every ``blocks`` / ``layers`` container, each a different module."""
    units = fsdp.fsdp_units(timm.create_model(name))
    assert len(units) == blocks and len({id(u) for u in units}) == blocks, [type(u).__name__ for u in units]


def test_fsdp_refuses_fp16():
    with pytest.raises(ConfigError, match=r"config key 'amp'='fp16': fp16 is not supported with --fsdp"):
        make_config(dict(model="test_vim", fsdp=True, amp="fp16")).validate()
