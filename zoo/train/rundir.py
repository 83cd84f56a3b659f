"""The run folder: which one a launch writes into, protection of earlier runs, clean-up after failures.

Rules (rank 0 decides, every rank gets the same answer):

- ``--experiment NAME``: ``<output>/NAME``. If it already holds a checkpoint, the launch must say what to do
  with it: ``--resume auto`` (or a ``--resume`` path inside it) continues it, ``--overwrite`` starts it over;
  anything else is an error, so a finished run is never replaced by accident.
- ``--resume PATH`` without ``--experiment``: the folder holding ``PATH`` (the run's own folder).
- ``--eval --finetune FILE`` without ``--experiment``: FILE's folder when that is a run folder (holds
  ``config.yaml``), so ``eval.json`` lands next to the weights it scores.
- ``--resume auto`` without ``--experiment``: the newest ``<output>/<model>-*`` run with a ``last.pth``;
  none: a new run (the message says so).
- otherwise a new ``<output>/<model>-<time>`` folder, created exclusively (``-2``, ``-3``... when another
  run took the name in the same second).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from .config import ConfigError, TrainConfig
from .distributed import all_gather_objects

__all__ = ["RunDir", "resolve_run_dir", "remove_shard_folders", "CHECKPOINT_NAMES", "SHARD_DIR_PREFIX"]

CHECKPOINT_NAMES = ("last.pth", "best.pth")
SHARD_DIR_PREFIX = "last.shards-step"  # a sharded (FSDP) run's last.pth names one such folder of shard files
# everything a run writes into its folder; --overwrite removes these (and only these)
RUN_OUTPUTS = CHECKPOINT_NAMES + ("config.yaml", "log.jsonl", "summary.json", "eval.json")


@dataclass
class RunDir:
    path: Path
    created: bool  # this launch made the folder (a failed launch removes it again when it stays empty)
    resume_path: Optional[Path]  # the checkpoint to continue from, None: a fresh start
    note: str = ""  # what was decided, for the log
    fresh: bool = False  # the folder was absent or empty before this launch

    def remove_if_unused(self) -> None:
        """After a failed launch: a folder this launch started (absent or empty before) that holds no
        checkpoint loses what the launch wrote into it (config.yaml, log.jsonl) and then the folder itself."""
        if not (self.created or self.fresh) or not self.path.is_dir():
            return
        if any((self.path / name).exists() for name in CHECKPOINT_NAMES):
            return
        for name in RUN_OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "tb", ignore_errors=True)
        if not any(self.path.iterdir()):
            self.path.rmdir()

    def remove_stale_temporaries(self) -> List[str]:
        """Temporary files of saves that a killed process never finished (``.last.pth.tmp<pid>``)."""
        removed = []
        for tmp in self.path.glob(".*.tmp*"):
            if tmp.is_file() and any(tmp.name.startswith(f".{name}.tmp") for name in CHECKPOINT_NAMES):
                tmp.unlink(missing_ok=True)
                removed.append(tmp.name)
        return removed


def remove_shard_folders(run_folder: Path, keep: Optional[str] = None) -> List[str]:
    """Shard folders in ``run_folder`` other than ``keep``: older checkpoints, saves a kill interrupted."""
    removed = []
    for folder in sorted(run_folder.glob(SHARD_DIR_PREFIX + "*")):
        if folder.is_dir() and folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _new_run_folder(output: Path, model: str) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    base = f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 10_000):
        path = output / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()  # exclusive: two launches in the same second get different folders
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {output} (names {base}-* all taken)")


def _latest_run(output: Path, model: str) -> Optional[Path]:
    runs = [p for p in output.glob(f"{model}-*") if (p / "last.pth").is_file()]
    return max(runs, key=lambda p: (p / "last.pth").stat().st_mtime) if runs else None


def _is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def _decide(cfg: TrainConfig) -> RunDir:
    output = Path(cfg.output).expanduser()
    explicit_resume = Path(cfg.resume).expanduser() if cfg.resume and cfg.resume != "auto" else None
    if cfg.experiment:
        path = output / cfg.experiment
        resume = explicit_resume
        if cfg.resume == "auto" and (path / "last.pth").is_file():
            resume = path / "last.pth"
        fresh = not path.is_dir() or not any(path.iterdir())
        return RunDir(path, False, resume, fresh=fresh)
    if explicit_resume is not None:
        return RunDir(explicit_resume.parent, False, explicit_resume,
                      f"writing into the checkpoint's run folder {explicit_resume.parent}")
    if cfg.eval_only and cfg.finetune and _is_run_folder(Path(cfg.finetune).expanduser().parent):
        folder = Path(cfg.finetune).expanduser().parent
        return RunDir(folder, False, None, f"writing eval.json into the weights' run folder {folder}")
    if cfg.resume == "auto":
        latest = _latest_run(output, cfg.model)
        if latest is not None:
            return RunDir(latest, False, latest / "last.pth",
                          f"--resume auto without --experiment: continuing the newest {cfg.model} run, {latest}")
        if cfg.eval_only:
            raise ConfigError(f"--eval --resume auto: no {cfg.model}-* run with a last.pth under {output}; "
                              "pass --experiment NAME or --resume PATH")
        path = _new_run_folder(output, cfg.model)
        return RunDir(path, True, None, f"--resume auto without --experiment: no earlier {cfg.model} run with "
                                        f"a last.pth under {output}, starting a new run in {path}")
    return RunDir(_new_run_folder(output, cfg.model), True, None)


def _protect(run_dir: RunDir, cfg: TrainConfig, say: Callable[[str], None]) -> None:
    """Never replace an earlier run's checkpoints without an explicit choice."""
    held = [name for name in CHECKPOINT_NAMES if (run_dir.path / name).is_file()]
    if cfg.eval_only or not held:
        return
    resume = run_dir.resume_path
    continuing = resume is not None and resume.resolve().parent == run_dir.path.resolve()
    if continuing:
        return
    if cfg.overwrite:
        for name in RUN_OUTPUTS:
            (run_dir.path / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir.path / "tb", ignore_errors=True)
        remove_shard_folders(run_dir.path)
        say(f"[train] --overwrite: removed the earlier run's {', '.join(held)} and logs in {run_dir.path}")
        return
    where = f" (--resume points at {resume})" if resume is not None else ""
    raise ConfigError(
        f"run folder {run_dir.path} already holds {' and '.join(held)} from an earlier run{where}; pass "
        "--resume auto to continue it, --overwrite to start it over, or another --experiment name")


def resolve_run_dir(cfg: TrainConfig, is_main: bool, say: Callable[[str], None]) -> RunDir:
    """The folder this launch writes into (the same on every rank) and the checkpoint to resume from."""
    decided: Optional[RunDir] = None
    error: Optional[str] = None
    if is_main:
        try:
            decided = _decide(cfg)
            _protect(decided, cfg, say)
        except ConfigError as err:
            if decided is not None:
                decided.remove_if_unused()
            error = str(err)
    decided, error = all_gather_objects((decided, error))[0]
    if error is not None:
        raise ConfigError(error)
    if decided.note:
        say(f"[train] {decided.note}")
    if not is_main:
        decided.created = decided.fresh = False  # only rank 0 may remove the folder
    return decided
