"""The training run: wires data, model, optimisation, checkpoints and logging together."""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from timm.data import resolve_data_config
from timm.utils import ModelEmaV3

from . import checkpoint as ckpt_io
from . import fsdp
from .config import ConfigError, TrainConfig, save_config
from .data import (ShardSampler, SeededTransformDataset, build_datasets, build_loader, build_streaming_datasets,
                   build_train_sampler, build_transforms, is_streaming, steps_per_epoch)
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed
from .engine import (LossMeter, NonFiniteLossError, TrainState, amp_dtype, build_criterion, build_mixup,
                     build_model, build_optimizer_and_scheduler, check_input_size, evaluate, peak_memory_mb,
                     train_one_epoch)
from .logger import RunLogger
from .rundir import SHARD_DIR_PREFIX, RunDir, remove_shard_folders, resolve_run_dir

__all__ = ["run", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _batch_layout(cfg: TrainConfig, world_size: int):
    micro = cfg.batch_size or max(cfg.global_batch_size // world_size, 1)
    per_step = micro * world_size
    accum = max(cfg.global_batch_size // per_step, 1)
    if micro * world_size * accum != cfg.global_batch_size:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not batch_size ({micro}) x processes ({world_size}) "
            f"x accumulation steps; pick batch_size so that it divides global_batch_size / {world_size}"
        )
    return micro, accum


def _reduce_eval(sums: Dict[str, float], device: torch.device) -> Dict[str, float]:
    loss, top1, top5, count = all_reduce_sum(
        [sums["loss_sum"], sums["top1_hits"], sums["top5_hits"], sums["count"]], device)
    count = max(count, 1)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "images": int(count)}


def run(cfg: TrainConfig, on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Trains (or with ``cfg.eval_only`` evaluates) as described by ``cfg``; returns the final summary.

    ``on_step`` is called on every process after each optimizer step with the step's counters (and, at log
    intervals, its numbers); tests use it to interrupt a run.
    """
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    owns_group = not torch.distributed.is_initialized()
    dist_info: DistInfo = init_distributed(cfg.device, need_group=cfg.fsdp and not cfg.eval_only)
    say = (lambda message: print(message, flush=True)) if dist_info.is_main else (lambda message: None)
    run_dir = resolve_run_dir(cfg, dist_info.is_main, say)
    logger = RunLogger(run_dir.path, dist_info.is_main, cfg.tensorboard)
    try:
        if cfg.eval_only:
            return _evaluate_only(cfg, dist_info, run_dir, logger)
        return _Training(cfg, dist_info, run_dir, logger, on_step).fit()
    except BaseException:
        logger.close()
        run_dir.remove_if_unused()  # a failed launch that saved no checkpoint leaves no run folder behind
        raise
    finally:
        logger.close()
        if owns_group and dist_info.world_size == 1:
            cleanup()  # the one-process group this run made for FSDP (torchrun's groups are the launcher's)


@dataclass
class _Setup:
    """What training and evaluation share: data, model, transforms, validation loader."""

    data: Any
    model: nn.Module
    data_config: Dict[str, Any]
    train_tf: Callable
    val_loader: Any
    dtype: Optional[torch.dtype]


def _set_up(cfg: TrainConfig, dist_info: DistInfo, logger: RunLogger) -> _Setup:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    streaming = is_streaming(cfg)
    data = build_streaming_datasets(cfg, _batch_layout(cfg, world)[0], world) if streaming else build_datasets(cfg)
    # identical initial weights on every rank; then a per-rank stream for dropout / mixup / shuffles
    seed_everything(cfg.seed)
    model = build_model(cfg, data.num_classes)
    data_config = resolve_data_config({}, model=model)
    if cfg.img_size is not None:
        data_config["input_size"] = (3, cfg.img_size, cfg.img_size)
        check_input_size(lambda: build_model(cfg, data.num_classes), cfg, data_config["input_size"])
    if cfg.crop_pct is not None:
        data_config["crop_pct"] = cfg.crop_pct
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(cfg.seed + rank)
    train_tf, eval_tf = build_transforms(cfg, data_config)
    eval_batch = max(cfg.batch_size or cfg.global_batch_size // world, 1)
    if streaming:  # timm's reader splits the shards over ranks and workers and applies the transform
        data.val.transform = eval_tf
        val_loader = build_loader(data.val, None, eval_batch, cfg, train=False, device=device)
    else:
        val_set = SeededTransformDataset(data.val, eval_tf)
        val_loader = build_loader(val_set, ShardSampler(len(val_set), rank, world), eval_batch, cfg, train=False,
                                  device=device)
    dtype = amp_dtype(cfg)
    if dtype is not None and device.type == "cpu" and dtype == torch.float16:
        logger.print("[train] note: fp16 autocast on CPU is slow and rarely useful; bf16 is the default")
    return _Setup(data, model, data_config, train_tf, val_loader, dtype)


class _Training:
    """One training launch: builds the optimisation state, restores a checkpoint, runs the epochs."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, run_dir: RunDir, logger: RunLogger, on_step):
        self.cfg, self.dist, self.run_dir, self.logger, self.on_step = cfg, dist_info, run_dir, logger, on_step
        self.out_dir = run_dir.path
        self.setup = setup = _set_up(cfg, dist_info, logger)
        self.model, self.device, world = setup.model, dist_info.device, dist_info.world_size
        self.micro, self.accum = _batch_layout(cfg, world)
        self.sampler = None
        if is_streaming(cfg):
            self.train_set = setup.data.train
            self.train_set.transform = setup.train_tf
            local = len(self.train_set)
        else:
            self.train_set = SeededTransformDataset(setup.data.train, setup.train_tf)
            self.sampler = build_train_sampler(self.train_set, cfg, dist_info.rank, world)
            local = len(self.sampler.inner)
        self.steps = steps_per_epoch(local, self.micro, self.accum)
        if self.steps < 1:
            raise ConfigError(
                f"the training set ({len(setup.data.train)} images, {local} per process) is "
                f"smaller than one step of global_batch_size={cfg.global_batch_size}; lower --global-batch-size")
        self.train_loader = build_loader(self.train_set, self.sampler, self.micro, cfg, train=True,
                                         device=self.device)
        # a checkpoint to resume from wins over --finetune; with --resume auto and no last.pth yet (the first
        # launch of a fine-tuning run) the fine-tuning weights are the starting point
        if cfg.finetune and run_dir.resume_path is None:
            report = ckpt_io.load_finetune_weights(self.model, cfg.finetune)
            logger.print(f"[train] fine-tuning from {cfg.finetune}: {len(report['missing'])} missing, "
                         f"{len(report['unexpected'])} unexpected, dropped {report['dropped']}, "
                         f"resized {report['resized']}")
        self.sharded = cfg.fsdp
        # FSDP modules cannot be deep-copied: the EMA copy is taken first and sharded the same way
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        if self.sharded:
            fsdp.shard_model(self.model)
            if self.ema is not None:
                fsdp.shard_model(self.ema.module)
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(cfg, self.model, self.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=setup.dtype == torch.float16)
        self.mixup = build_mixup(cfg, setup.data.num_classes)
        if self.mixup is not None and self.micro % 2:
            raise ConfigError(f"mixup/cutmix need an even per-process batch, got batch_size={self.micro}")
        self.criterion = build_criterion(cfg, self.mixup)
        self.state = TrainState()
        self.meter: Optional[LossMeter] = None
        self.resumed_shards: Optional[str] = None  # the shard folder of the checkpoint resumed from
        if run_dir.resume_path is not None:
            _restore(run_dir.resume_path, self, logger)
        self.train_model: nn.Module = self.model
        if dist_info.enabled and not self.sharded:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- checkpoints -------------------------------------------------------------------------------------
    def _payload(self, rng_states, weights: Dict[str, Any], epoch_totals) -> Dict[str, Any]:
        state = self.state
        return dict(weights, **{
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "epoch_loss_sum": float(epoch_totals[0]),  # over all ranks: resumable on any number of them
            "epoch_samples": int(epoch_totals[1]),
            "epoch_seconds": float(state.epoch_seconds),
            "best_top1": state.best_top1,
            "best_epoch": state.best_epoch,
            "history": state.history,
            "rng": rng_states,
            "config": self.cfg.to_dict(),
            "format": "zoo-train-v1",
        })

    def _modules(self):
        return [("model", self.model)] + ([("model_ema", self.ema.module)] if self.ema is not None else [])

    def _check_finite(self) -> None:
        """Before any checkpoint: a diverged loss or non-finite weights must not replace the last good file."""
        if self.meter is not None:
            self.meter.sync()
        if not fsdp.all_finite([t for _, m in self._modules() for t in m.state_dict().values()], self.device):
            raise NonFiniteLossError(
                f"weights became non-finite by global step {self.state.global_step} (epoch {self.state.epoch}); "
                f"not saving them, so {self.out_dir / 'last.pth'} keeps the last finite state; lower the lr "
                f"or enable --clip-grad (non-finite on this rank: {', '.join(self._non_finite_names()) or 'none'})")

    def _non_finite_names(self, most: int = 8) -> List[str]:
        """The state-dict keys (``model.`` / ``model_ema.``) of this rank's non-finite tensors, the first `most`."""
        names = [f"{prefix}.{key}" for prefix, m in self._modules() for key, t in m.state_dict().items()
                 if t.is_floating_point() and not bool(torch.isfinite(fsdp.local_tensor(t)).all())]
        return names[:most] + ([f"... {len(names) - most} more"] if len(names) > most else [])

    def save_last(self) -> None:
        self._check_finite()
        # every rank hands its RNG state to rank 0, so a resumed multi-process run continues each stream
        rng_states = all_gather_objects(ckpt_io.capture_rng_state())
        totals = all_reduce_sum([self.state.epoch_loss_sum, self.state.epoch_samples], self.device)
        if self.sharded:
            self._save_sharded(rng_states, totals)
        elif self.dist.is_main:
            weights = {name: m.state_dict() for name, m in self._modules()}
            weights.setdefault("model_ema", None)
            weights["optimizer"] = self.optimizer.state_dict()
            ckpt_io.atomic_save(self._payload(rng_states, weights, totals), self.out_dir / "last.pth")
            remove_shard_folders(self.out_dir)  # a sharded checkpoint this run resumed from is replaced
        barrier()

    def _save_sharded(self, rng_states, totals) -> None:
        """Each rank writes its rows into a new shard folder; last.pth names it once all of them are there."""
        rank, world = self.dist.rank, self.dist.world_size
        folder = all_gather_objects(f"{SHARD_DIR_PREFIX}{self.state.global_step:09d}-{time.time_ns():x}")[0]
        if self.dist.is_main:
            (self.out_dir / folder).mkdir()
        barrier()
        plain_optimizer, tensors = fsdp.training_tensors({name: m.state_dict() for name, m in self._modules()},
                                                         self.optimizer.state_dict())
        error = None
        try:
            fsdp.save_shards(self.out_dir / folder, tensors, rank, world)
        except ckpt_io.CheckpointWriteError as err:
            error = str(err)
        errors = [e for e in all_gather_objects(error) if e]
        if errors:  # every rank stops with the same message; last.pth still names the previous folder
            raise ckpt_io.CheckpointWriteError(errors[0])
        if self.dist.is_main:
            weights = {"optimizer": plain_optimizer, "shards": {"folder": folder, "world_size": world}}
            ckpt_io.atomic_save(self._payload(rng_states, weights, totals), self.out_dir / "last.pth")
            remove_shard_folders(self.out_dir, keep=folder)

    def save_best(self, epoch: int, top1: float) -> None:
        # best.pth: whole weights only (plus metrics), loadable with --finetune or --eval --finetune
        gather = fsdp.full_state_dict if self.sharded else (lambda m: m.state_dict())
        weights = {name: gather(m) for name, m in self._modules()}  # gathering is collective under FSDP
        if self.dist.is_main:
            ckpt_io.atomic_save({"model": weights["model"], "model_ema": weights.get("model_ema"),
                                 "epoch": epoch, "val_top1": top1, "config": self.cfg.to_dict()},
                                self.out_dir / "best.pth")

    def step_hook(self, info: Dict[str, Any]) -> None:
        state, cfg = self.state, self.cfg
        if info and self.dist.is_main and state.global_step % cfg.log_interval == 0:
            self.logger.log("step", state.global_step, epoch=state.epoch, **info)
        if cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0 and state.step_in_epoch < self.steps:
            self.save_last()
        if self.on_step is not None:
            self.on_step(dict(info, global_step=state.global_step, epoch=state.epoch,
                              step_in_epoch=state.step_in_epoch))

    # -- the run -----------------------------------------------------------------------------------------
    def _announce(self) -> None:
        cfg, data, world = self.cfg, self.setup.data, self.dist.world_size
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # and shard folders no checkpoint names (older saves, or a save a kill interrupted)
            stale = self.run_dir.remove_stale_temporaries() + remove_shard_folders(self.out_dir, self.resumed_shards)
            if stale:
                self.logger.print(f"[train] removed unfinished checkpoint writes of a killed run: {', '.join(stale)}")
            if self.run_dir.resume_path is not None:
                dropped = self.logger.drop_records_after(self.state.global_step)
                if dropped:
                    self.logger.print(f"[train] log.jsonl: dropped {dropped} records after step "
                                      f"{self.state.global_step} (the resumed run redoes those steps)")
            save_config(cfg, self.out_dir / "config.yaml")
        n_params = sum(p.numel() for p in self.model.parameters())
        self.logger.print(
            f"[train] {cfg.model} ({n_params / 1e6:.2f} M params) on {self.device} x{world}; "
            f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
            f"input {tuple(self.setup.data_config['input_size'])}; global batch {cfg.global_batch_size} = "
            f"{self.micro} x {world} x accum {self.accum}; {self.steps} steps/epoch; amp={cfg.amp}; "
            f"threads {torch.get_num_threads()}, workers {cfg.workers}; output {self.out_dir}")
        self.logger.log("run", self.state.global_step, config=cfg.to_dict(), steps_per_epoch=self.steps,
                        world_size=world, params=n_params,
                        resumed_from=str(self.run_dir.resume_path) if self.run_dir.resume_path else None)

    def _train_epoch(self) -> Dict[str, float]:
        cfg, state = self.cfg, self.state
        skip = 0
        if self.sampler is not None:
            self.sampler.set_epoch(state.epoch, start=state.step_in_epoch * self.accum * self.micro)
        else:  # a stream restarts its epoch: skip the micro-batches done before the checkpoint
            self.train_set.set_epoch(state.epoch)
            skip = state.step_in_epoch * self.accum
        self.meter = LossMeter(self.device, state, cfg.amp)
        progress = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.steps, initial=state.step_in_epoch,
                            desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True,
                            leave=True)
        try:
            return train_one_epoch(
                self.train_model, self.train_loader, criterion=self.criterion, optimizer=self.optimizer,
                scheduler=self.scheduler, scaler=self.scaler, state=state, steps=self.steps,
                accum_steps=self.accum, device=self.device, dtype=self.setup.dtype, mixup=self.mixup,
                ema=self.ema, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                channels_last=cfg.channels_last, log_interval=cfg.log_interval, meter=self.meter,
                on_step=self.step_hook, progress=progress, skip_batches=skip)
        finally:
            if progress is not None:
                progress.close()

    def _epoch_record(self, epoch: int, stats: Dict[str, float]) -> Dict[str, Any]:
        cfg, device, dtype = self.cfg, self.device, self.setup.dtype
        loss_sum, samples = all_reduce_sum([stats["loss_sum"], stats["samples"]], device)
        # throughput: every device's images over the slowest device's seconds; memory: the largest peak
        per_rank = all_gather_objects((stats["seconds"], peak_memory_mb(device)))
        seconds = max(s for s, _ in per_rank)
        lockstep = tuple(self.setup.data_config["input_size"]) if self.sharded else None
        metrics = _reduce_eval(evaluate(self.model, self.setup.val_loader, device, dtype, cfg.channels_last,
                                        lockstep), device)
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(samples, 1),
            "val_loss": metrics["loss"],
            "val_top1": metrics["top1"],
            "val_top5": metrics["top5"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": samples / max(seconds, 1e-9),
            "img_per_s_per_device": samples / max(seconds, 1e-9) / self.dist.world_size,
            "peak_mem_mb": max(m for _, m in per_rank),
            "train_images": int(samples),
            "train_seconds": seconds,
        }
        if self.ema is not None:
            ema_metrics = _reduce_eval(
                evaluate(self.ema.module, self.setup.val_loader, device, dtype, cfg.channels_last, lockstep),
                device)
            record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"], ema_loss=ema_metrics["loss"])
        return record

    def fit(self) -> Dict[str, Any]:
        cfg, state = self.cfg, self.state
        self._announce()
        start_time = time.perf_counter()
        last_eval: Dict[str, Any] = {}
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            record = self._epoch_record(epoch, self._train_epoch())
            state.history.append(record)
            is_best = record["val_top1"] > state.best_top1
            if is_best:
                state.best_top1, state.best_epoch = record["val_top1"], epoch + 1
            state.epoch, state.step_in_epoch = epoch + 1, 0
            state.epoch_loss_sum, state.epoch_samples, state.epoch_seconds = 0.0, 0, 0.0
            self.meter = None
            self.logger.log("epoch", state.global_step, **record)
            ema_text = f", EMA top-1 {record['ema_top1']:.2f}" if self.ema is not None else ""
            self.logger.print(
                f"[train] epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                f"val loss {record['val_loss']:.4f}, top-1 {record['val_top1']:.2f}, top-5 {record['val_top5']:.2f}"
                f"{ema_text}; {record['img_per_s_per_device']:.0f} img/s per device, "
                f"peak memory {record['peak_mem_mb']:.0f} MB")
            self.save_last()
            if is_best:
                self.save_best(epoch + 1, record["val_top1"])
            last_eval = record
            barrier()
        return self._finish(start_time, last_eval)

    def _finish(self, start_time: float, last_eval: Dict[str, Any]) -> Dict[str, Any]:
        state, history = self.state, self.state.history
        images = sum(h.get("train_images", 0) for h in history)
        seconds = sum(h.get("train_seconds", 0.0) for h in history)
        summary = {
            "model": self.cfg.model,
            "epochs": self.cfg.epochs,
            "global_steps": state.global_step,
            "final": last_eval or (history[-1] if history else {}),
            "best_top1": state.best_top1,
            "best_epoch": state.best_epoch,
            "train_img_per_s": images / max(seconds, 1e-9),
            "train_img_per_s_per_device": images / max(seconds, 1e-9) / self.dist.world_size,
            "peak_mem_mb": max((h.get("peak_mem_mb", 0.0) for h in history), default=0.0),
            "wall_seconds": time.perf_counter() - start_time,
            "output": str(self.out_dir),
            "history": history,
        }
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.log("summary", state.global_step, **{k: v for k, v in summary.items() if k != "history"})
            _print_summary(summary, self.logger)
        return summary


# keys that do not change what the run computes (paths, loader plumbing, feedback; batch_size only splits the
# global batch into micro-batches); any other key changed between the checkpoint and the resumed run is reported
_RESUME_NEUTRAL_KEYS = frozenset({
    "resume", "finetune", "eval_only", "output", "experiment", "data_dir", "device", "workers", "pin_memory",
    "threads", "overwrite", "skip_corrupt", "fsdp",
    "persistent_workers", "batch_size", "log_interval", "save_every_steps", "progress", "tensorboard",
})


def _changed_keys(saved: Optional[Dict[str, Any]], cfg: TrainConfig) -> Dict[str, Any]:
    if not isinstance(saved, dict):
        return {}
    now = cfg.to_dict()
    return {k: (saved[k], now[k]) for k in now
            if k not in _RESUME_NEUTRAL_KEYS and k in saved and saved[k] != now[k]}


def _check_model_matches(ckpt: Dict[str, Any], path: Path, cfg: TrainConfig) -> None:
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if saved.get("model") and saved["model"] != cfg.model:
        raise ConfigError(f"{path} was written by a '{saved['model']}' run, this launch builds '{cfg.model}'; "
                          f"pass --model {saved['model']} to continue it, or --finetune {path} to start a new "
                          f"'{cfg.model}' run from its weights")


def _restore(path: Path, run: "_Training", logger: RunLogger) -> None:
    cfg, state = run.cfg, run.state
    ckpt = ckpt_io.load_training_checkpoint(path)
    _check_model_matches(ckpt, path, cfg)
    changed = _changed_keys(ckpt.get("config"), cfg)
    if changed:
        # the optimizer and LR-schedule state come from the checkpoint (timm's scheduler state includes its
        # length), so e.g. a larger --epochs does not stretch the schedule; say so rather than drift silently
        logger.print("[train] resume: config differs from the checkpoint's in "
                     + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items())
                     + "; optimizer and LR-schedule state are the checkpoint's, so the run will not match an "
                       "uninterrupted run of either config")
    # sharded or whole, written by any number of processes: laid out as this run's model is
    source = ckpt_io.weights_source(ckpt, path)
    fsdp.load_module(run.model, source, "model.", path, "--resume checkpoint")
    if run.ema is not None:
        ema_prefix = "model_ema." if ckpt_io.has_ema_weights(source) else "model."
        fsdp.load_module(run.ema.module, source, ema_prefix, path, "--resume checkpoint's EMA of")
    plain_optimizer = ckpt["optimizer"] if "shards" in ckpt else fsdp.split_optimizer_state(ckpt["optimizer"])[0]
    try:
        fsdp.load_optimizer(run.optimizer, plain_optimizer, source)
    except (ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"the optimizer state in {path} does not fit this run's optimizer "
                          f"(--opt {cfg.opt}): {err}") from err
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    state.epoch = int(ckpt["epoch"])
    state.step_in_epoch = int(ckpt["step_in_epoch"])
    state.global_step = int(ckpt["global_step"])
    # the epoch's partial loss sum covers all ranks of the writing run: rank 0 carries it on
    carried = run.dist.is_main
    state.epoch_loss_sum = float(ckpt.get("epoch_loss_sum", 0.0)) if carried else 0.0
    state.epoch_samples = int(ckpt.get("epoch_samples", 0)) if carried else 0
    state.epoch_seconds = float(ckpt.get("epoch_seconds", 0.0))
    state.best_top1 = float(ckpt.get("best_top1", -1.0))
    state.best_epoch = int(ckpt.get("best_epoch", -1))
    state.history = list(ckpt.get("history") or [])
    run.resumed_shards = ckpt["shards"]["folder"] if "shards" in ckpt else None
    run.scheduler.step_update(num_updates=state.global_step)
    rng, why = ckpt_io.split_rng_for_rank(ckpt.get("rng"), run.dist.rank, run.dist.world_size)
    if rng is not None:
        ckpt_io.restore_rng_state(rng)
    else:
        logger.print(f"[train] resume: {why}")
    logger.print(f"[train] resumed from {path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of it, "
                 f"global step {state.global_step}")


def _eval_weights(cfg: TrainConfig, model: nn.Module, run_dir: RunDir, logger: RunLogger):
    """Loads the weights --eval scores (all of them, or an error); returns (source, EMA copy or None)."""
    resume_path = run_dir.resume_path
    if cfg.resume == "auto" and resume_path is None and not cfg.finetune:
        raise ConfigError(f"--eval --resume auto: no checkpoint at {run_dir.path / 'last.pth'}")
    if resume_path is not None:
        ckpt = ckpt_io.load_training_checkpoint(resume_path, need_training_state=False)
        _check_model_matches(ckpt, resume_path, cfg)
        source = ckpt_io.weights_source(ckpt, resume_path)
        fsdp.load_module(model, source, "model.", resume_path, "--eval checkpoint")
        if not ckpt_io.has_ema_weights(source):
            return resume_path, None
        ema_model = copy.deepcopy(model)
        fsdp.load_module(ema_model, source, "model_ema.", resume_path, "--eval checkpoint's EMA of")
        return resume_path, ema_model
    if not cfg.finetune:
        raise ConfigError("--eval needs weights: pass --resume <last.pth> or --finetune <checkpoint>")
    report = ckpt_io.load_finetune_weights(model, cfg.finetune)
    # scoring a model whose weights did not all load would report a meaningless accuracy: refuse
    problems = [f"{len(report[k])} {k} (first: {report[k][:3]})" for k in ("missing", "unexpected", "dropped")
                if report[k]]
    if problems:
        raise ConfigError(f"--eval --finetune {cfg.finetune} does not fit '{cfg.model}' with "
                          f"{model.num_classes if hasattr(model, 'num_classes') else '?'} classes: "
                          + "; ".join(problems) + " ('dropped': shape differs, e.g. a classifier for another "
                          "number of classes); evaluation needs every weight of the model")
    if report["resized"]:
        logger.print(f"[eval] resampled {report['resized']} to this input size")
    return Path(cfg.finetune), None


def _evaluate_only(cfg: TrainConfig, dist_info: DistInfo, run_dir: RunDir, logger: RunLogger) -> Dict[str, Any]:
    setup = _set_up(cfg, dist_info, logger)
    model, device, dtype, val_loader = setup.model, dist_info.device, setup.dtype, setup.val_loader
    source, ema_model = _eval_weights(cfg, model, run_dir, logger)
    result: Dict[str, Any] = {"model": cfg.model, "weights": str(source)}
    result.update(_reduce_eval(evaluate(model, val_loader, device, dtype, cfg.channels_last), device))
    if ema_model is not None:
        ema = _reduce_eval(evaluate(ema_model, val_loader, device, dtype, cfg.channels_last), device)
        result.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    if dist_info.is_main:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        (run_dir.path / "eval.json").write_text(json.dumps(result, indent=2))
        ema_text = f" (EMA top-1 {result['ema_top1']:.2f}, top-5 {result['ema_top5']:.2f})" if ema_model else ""
        logger.print(f"[eval] {cfg.model} on {result['images']} images: top-1 {result['top1']:.2f}, "
                     f"top-5 {result['top5']:.2f}, loss {result['loss']:.4f}{ema_text}; wrote "
                     f"{run_dir.path / 'eval.json'}")
    return result


def _print_summary(summary: Dict[str, Any], logger: RunLogger) -> None:
    final = summary["final"] or {}
    lines = [
        "",
        f"=== {summary['model']}: {summary['epochs']} epochs, {summary['global_steps']} steps, "
        f"{summary['wall_seconds']:.0f} s ===",
        f"  final val top-1 {final.get('val_top1', float('nan')):.2f}  top-5 {final.get('val_top5', float('nan')):.2f}"
        f"  loss {final.get('val_loss', float('nan')):.4f}",
    ]
    if "ema_top1" in final:
        lines.append(f"  EMA   val top-1 {final['ema_top1']:.2f}  top-5 {final['ema_top5']:.2f}")
    lines += [
        f"  best  val top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']})",
        f"  train throughput {summary['train_img_per_s']:.0f} img/s "
        f"({summary['train_img_per_s_per_device']:.0f} per device), peak memory {summary['peak_mem_mb']:.0f} MB",
        f"  output {summary['output']} (config.yaml, log.jsonl, last.pth, best.pth, summary.json)",
    ]
    logger.print("\n".join(lines))
    sys.stdout.flush()
