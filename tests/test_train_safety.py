"""Nothing lost, nothing silent (issue 15): run folders are never overwritten by accident, diverged or killed
runs keep their last good state, partly fitting weights are never scored silently, and every bad input ends the
script with one line and exit code 2. Tiny runs (test_vim, 48 images of 16 px, 6 steps per epoch)."""
from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

import zoo
from _train_data import PYTHON, as_flags, load_script, subprocess_env, tiny_run_config, write_imagefolder
from zoo.train import ConfigError, NonFiniteLossError, make_config, run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
    """A finished 1-epoch run folder (last.pth, best.pth, log.jsonl...)."""
    out = tmp_path_factory.mktemp("finished")
    run(make_config(tiny_run_config(data, out, "done", epochs=1)))
    return out / "done"


def _script(argv, capsys):
    code = load_script().main([str(a) for a in argv])
    return code, capsys.readouterr().err


# -- item 1: never overwrite a run holding a checkpoint; unique folder names --------------------------------

def test_rerun_of_an_existing_experiment_needs_resume_or_overwrite(tmp_path, data):
    values = tiny_run_config(data, tmp_path, "exp", epochs=1)
    run(make_config(values))
    folder = tmp_path / "exp"
    before = {name: (folder / name).read_bytes() for name in ("last.pth", "best.pth", "config.yaml", "log.jsonl")}
    with pytest.raises(ConfigError, match=r"already holds last\.pth and best\.pth.*--resume auto.*--overwrite"):
        run(make_config(dict(values, lr=1e-3)))
    assert {name: (folder / name).read_bytes() for name in before} == before  # nothing touched
    run(make_config(dict(values, overwrite=True, lr=1e-3)))
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in log].count("run") == 1  # the old run's records went with it
    assert torch.load(folder / "last.pth", weights_only=True)["config"]["lr"] == 1e-3


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, data, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: "20990101-000000")
    first = run(make_config(tiny_run_config(data, tmp_path, None, epochs=1)))
    second = run(make_config(tiny_run_config(data, tmp_path, None, epochs=1)))
    assert first["output"] != second["output"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_vim-20990101-000000", "test_vim-20990101-000000-2"]


# -- item 5: a diverged step never replaces the last finite checkpoint ---------------------------------------

def test_non_finite_weights_are_never_saved_over_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    """The optimizer step at global step 3 makes a weight inf while that step's loss was still finite; with
    --save-every-steps 1 the save of step 3 must refuse, leaving the step-2 checkpoint in place."""
    from zoo.train import runner

    original = runner.build_optimizer_and_scheduler

    def poisoned(cfg, model, steps):
        optimizer, scheduler = original(cfg, model, steps)
        step, calls = optimizer.step, []

        def step_then_poison(*args, **kwargs):
            out = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            return out

        optimizer.step = step_then_poison
        return optimizer, scheduler

    monkeypatch.setattr(runner, "build_optimizer_and_scheduler", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite") as err:
        run(make_config(tiny_run_config(data, tmp_path, "div", save_every_steps=1, ema=False)))
    poisoned_name = next(zoo.create_model("test_vim", img_size=16, num_classes=3).named_parameters())[0]
    assert f"non-finite on this rank: model.{poisoned_name}" in str(err.value)  # the error names the tensor
    ckpt = torch.load(tmp_path / "div" / "last.pth", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


# -- item 6: kill -9 mid-epoch, then resume ------------------------------------------------------------------

_KILL = textwrap.dedent("""
    import json, os, signal, sys
    from zoo.train import make_config, run
    def hook(info):
        if info["global_step"] == 9:
            os.kill(os.getpid(), signal.SIGKILL)
    run(make_config(json.loads(sys.argv[1])), on_step=hook)
""")


def test_kill_and_resume_keeps_the_epoch_loss_and_a_clean_log(tmp_path, data):
    """Killed after step 9 (last save at step 8, mid epoch 2), then resumed: epoch 2's train loss covers all
    6 of its steps (equal to the uninterrupted run's), log.jsonl has each step once, and the temporary file a
    killed save left behind is removed."""
    common = dict(save_every_steps=4, log_interval=1)
    straight = run(make_config(tiny_run_config(data, tmp_path, "straight", **common)))
    values = tiny_run_config(data, tmp_path, "killed", **common)
    proc = subprocess.run([PYTHON, "-c", _KILL, json.dumps(values)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = tmp_path / "killed" / ".last.pth.tmp99999"
    stale.write_bytes(b"torn")
    resumed = run(make_config(dict(values, resume="auto")))
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert resumed["history"][1]["train_images"] == 48
    steps = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "log.jsonl").read_text().splitlines())
             if r["type"] == "step"]
    assert steps == list(range(1, 13))
    assert not stale.exists()


# -- item 7: --eval --finetune with weights that only partly fit --------------------------------------------

@pytest.mark.parametrize("source_kwargs, needle", [
    (dict(num_classes=1000), r"dropped.*head\.weight"),  # a 1000-class head into a 3-class model
    (dict(num_classes=3, depth=1), r"missing.*blocks\.1"),  # 1 of 2 blocks
])
def test_eval_refuses_weights_that_do_not_all_load(tmp_path, data, source_kwargs, needle):
    path = tmp_path / "weights.pth"
    torch.save({"model": zoo.create_model("test_vim", img_size=16, **source_kwargs).state_dict()}, path)
    with pytest.raises(ConfigError, match=needle):
        run(make_config(tiny_run_config(data, tmp_path, "ev", eval_only=True, finetune=str(path))))
    assert not (tmp_path / "ev").exists()


# -- item 11: named corrupt images, clear one-line errors, no empty folders -------------------------------------

def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, data, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    bad = sorted((root / "train" / "class_1").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated file
    flags = as_flags(tiny_run_config(root, tmp_path / "out", None, epochs=1))
    code, err = _script(flags, capsys)
    assert code == 2 and str(bad) in err and "--skip-corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code, err = _script(flags + ["--skip-corrupt", "--workers", "0"], capsys)
    assert code == 0 and f"skipping unreadable image {bad}" in err


def _class_mismatch(root: Path) -> None:
    (root / "val" / "class_2").rename(root / "val" / "class_x")


@pytest.mark.parametrize("extra, needle", [
    (["--img-size", "0"], "'img_size'=0"),
    (["--img-size", "15"], r"cannot be built with \{'img_size': 15\}: Vim: input size 15x15"),
    (["--img-size", "15", "--model", "test_convnext"], "cannot take 15x15 inputs"),  # found by a meta-device probe
    (["--model-kwargs", "{depth: -1}"], "depth must be >= 1"),
    (["--resume", "{finished}/best.pth"], "holds weights only.*--finetune"),
    (["--resume", "{finished}/last.pth", "--model", "test_vit", "--experiment", "other"],
     "written by a 'test_vim' run"),
    (["--data-dir", "{mismatch}"], r"only in .*/train: \['class_2'\]; only in .*/val: \['class_x'\]"),
])
def test_bad_inputs_end_in_one_line_with_exit_code_2(tmp_path, data, finished, capsys, extra, needle):
    import re
    import shutil

    mismatch = tmp_path / "mismatch"
    shutil.copytree(data, mismatch)
    _class_mismatch(mismatch)
    out = tmp_path / "out"
    argv = as_flags(tiny_run_config(data, out, None, epochs=1))
    argv += [a.replace("{finished}", str(finished)).replace("{mismatch}", str(mismatch)) for a in extra]
    code, err = _script(argv, capsys)
    assert code == 2, err
    assert re.search(needle, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())  # no empty run folder left


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, data, capsys):
    code, err = _script(as_flags(tiny_run_config(data, tmp_path, None, device="cuda")), capsys)
    assert code == 2 and "--device cuda" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_bad_yaml_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        load_script().main(["--model-kwargs", "{depth: -1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--model-kwargs" in err and "not a YAML value" in err and "Traceback" not in err


def test_full_disk_is_a_one_line_error(tmp_path, data, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, err = _script(as_flags(tiny_run_config(data, tmp_path, "full", epochs=1)), capsys)
    assert code == 2 and "No space left on device" in err and "last.pth" in err and "Traceback" not in err


# -- items 12 and 14: --threads, --help, the run's own folder, --resume auto without --experiment -------------

def test_help_shows_what_a_bare_run_does(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS default: 8 [with --config/--data-dir: 300]" in text
    assert "--amp AMP default: none [with --config/--data-dir: bf16]" in text
    assert "--threads THREADS" in text


def test_resume_path_and_eval_write_into_the_runs_own_folder(tmp_path, data, capsys):
    values = tiny_run_config(data, tmp_path, "own", epochs=1)
    run(make_config(values))
    last = tmp_path / "own" / "last.pth"
    longer = run(make_config(dict(values, experiment=None, resume=str(last), epochs=2, threads=1)))
    assert longer["output"] == str(tmp_path / "own") and longer["global_steps"] == 12
    evaluated = run(make_config(dict(values, experiment=None, resume=str(last), eval_only=True)))
    assert json.loads((tmp_path / "own" / "eval.json").read_text())["top1"] == evaluated["top1"]
    # eval of the run's best.pth through --finetune also lands in the run's folder
    (tmp_path / "own" / "eval.json").unlink()
    run(make_config(dict(values, experiment=None, finetune=str(tmp_path / "own" / "best.pth"), eval_only=True)))
    assert (tmp_path / "own" / "eval.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own"]


def test_resume_auto_without_experiment_continues_the_newest_run(tmp_path, data, capsys):
    values = tiny_run_config(data, tmp_path, None, epochs=1)
    first = run(make_config(dict(values, resume="auto")))  # nothing to continue yet: a new run, and it says so
    assert "no earlier test_vim run" in capsys.readouterr().out
    again = run(make_config(dict(values, resume="auto", epochs=2)))
    assert "continuing the newest test_vim run" in capsys.readouterr().out
    assert again["output"] == first["output"] and again["global_steps"] == 12
    assert len(list(tmp_path.iterdir())) == 1
