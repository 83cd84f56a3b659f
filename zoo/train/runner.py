"""The training run: wires data, model, optimisation, checkpoints and logging together."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from timm.data import resolve_data_config
from timm.utils import ModelEmaV3

from . import checkpoint as ckpt_io
from .config import ConfigError, TrainConfig, save_config
from .data import (ShardSampler, SeededTransformDataset, build_datasets, build_loader, build_train_sampler,
                   build_transforms, steps_per_epoch)
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed
from .engine import (TrainState, amp_dtype, build_criterion, build_mixup, build_model,
                     build_optimizer_and_scheduler, evaluate, train_one_epoch)
from .logger import RunLogger

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


def _resolve_output(cfg: TrainConfig) -> Path:
    name = cfg.experiment or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    # every rank must agree on the folder (timestamps may differ by a second between processes)
    name = all_gather_objects(name)[0]
    return Path(cfg.output).expanduser() / name


def run(cfg: TrainConfig, on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Trains (or with ``cfg.eval_only`` evaluates) as described by ``cfg``; returns the final summary.

    ``on_step`` is called on every process after each optimizer step with the step's numbers and the
    :class:`TrainState` (tests use it to interrupt a run).
    """
    cfg.validate()
    dist_info: DistInfo = init_distributed(cfg.device)
    out_dir = _resolve_output(cfg)
    logger = RunLogger(out_dir, dist_info.is_main, cfg.tensorboard)
    try:
        return _run(cfg, dist_info, out_dir, logger, on_step)
    finally:
        logger.close()


def _run(cfg: TrainConfig, dist_info: DistInfo, out_dir: Path, logger: RunLogger, on_step) -> Dict[str, Any]:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    data = build_datasets(cfg)

    # identical initial weights on every rank; then a per-rank stream for dropout / mixup / shuffles
    seed_everything(cfg.seed)
    model = build_model(cfg, data.num_classes)
    data_config = resolve_data_config({}, model=model)
    if cfg.img_size is not None:
        data_config["input_size"] = (3, cfg.img_size, cfg.img_size)
    if cfg.crop_pct is not None:
        data_config["crop_pct"] = cfg.crop_pct
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(cfg.seed + rank)

    train_tf, eval_tf = build_transforms(cfg, data_config)
    val_set = SeededTransformDataset(data.val, eval_tf)
    val_loader = build_loader(val_set, ShardSampler(len(val_set), rank, world),
                              max(cfg.batch_size or cfg.global_batch_size // world, 1), cfg, train=False,
                              device=device)
    dtype = amp_dtype(cfg)
    if dtype is not None and device.type == "cpu" and dtype == torch.float16:
        logger.print("[train] note: fp16 autocast on CPU is slow and rarely useful; bf16 is the default")

    if cfg.eval_only:
        return _evaluate_only(cfg, model, val_loader, dist_info, out_dir, logger, dtype)

    micro, accum = _batch_layout(cfg, world)
    train_set = SeededTransformDataset(data.train, train_tf)
    sampler = build_train_sampler(train_set, cfg, rank, world)
    steps = steps_per_epoch(len(sampler.inner), micro, accum)
    if steps < 1:
        raise ConfigError(
            f"the training set ({len(data.train)} images, {len(sampler.inner)} per process) is smaller than one "
            f"step of global_batch_size={cfg.global_batch_size}; lower --global-batch-size"
        )
    train_loader = build_loader(train_set, sampler, micro, cfg, train=True, device=device)

    # a checkpoint to resume from wins over --finetune; with --resume auto and no last.pth yet (the first
    # launch of a fine-tuning run) the fine-tuning weights are the starting point
    resume_path = _resume_path(cfg, out_dir)
    finetune_report = None
    if cfg.finetune and resume_path is None:
        finetune_report = ckpt_io.load_finetune_weights(model, cfg.finetune)
        logger.print(f"[train] fine-tuning from {cfg.finetune}: {len(finetune_report['missing'])} missing, "
                     f"{len(finetune_report['unexpected'])} unexpected, dropped {finetune_report['dropped']}, "
                     f"resized {finetune_report['resized']}")

    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    mixup = build_mixup(cfg, data.num_classes)
    if mixup is not None and micro % 2:
        raise ConfigError(f"mixup/cutmix need an even per-process batch, got batch_size={micro}")
    criterion = build_criterion(cfg, mixup)
    state = TrainState()

    if resume_path is not None:
        _restore(resume_path, model, ema, optimizer, scheduler, scaler, state, dist_info, logger, cfg)

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    n_params = sum(p.numel() for p in model.parameters())
    logger.print(
        f"[train] {cfg.model} ({n_params / 1e6:.2f} M params) on {device} x{world}; "
        f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
        f"input {tuple(data_config['input_size'])}; global batch {cfg.global_batch_size} = {micro} x {world} "
        f"x accum {accum}; {steps} steps/epoch; amp={cfg.amp}; output {out_dir}"
    )
    logger.log("run", state.global_step, config=cfg.to_dict(), steps_per_epoch=steps, world_size=world,
               params=n_params)

    def save(name: str, extra: Optional[Dict[str, Any]] = None) -> None:
        # every rank hands its RNG state to rank 0, so a resumed multi-process run continues each stream
        rng_states = all_gather_objects(ckpt_io.capture_rng_state())
        if dist_info.is_main:
            payload = {
                "model": model.state_dict(),
                "model_ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch,
                "global_step": state.global_step,
                "best_top1": state.best_top1,
                "best_epoch": state.best_epoch,
                "history": state.history,
                "rng": rng_states,
                "config": cfg.to_dict(),
                "format": "zoo-train-v1",
            }
            if extra:
                payload.update(extra)
            ckpt_io.atomic_save(payload, out_dir / name)
        barrier()

    def step_hook(info: Dict[str, Any]) -> None:
        if dist_info.is_main and state.global_step % cfg.log_interval == 0:
            logger.log("step", state.global_step, epoch=state.epoch, **info)
        if cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0 and state.step_in_epoch < steps:
            save("last.pth")
        if on_step is not None:
            on_step(dict(info, global_step=state.global_step, epoch=state.epoch,
                         step_in_epoch=state.step_in_epoch))

    start_time = time.perf_counter()
    images_seen, train_seconds = 0, 0.0
    last_eval: Dict[str, Any] = {}
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        sampler.set_epoch(epoch, start=state.step_in_epoch * accum * micro)
        progress = None
        if cfg.progress and dist_info.is_main:
            from tqdm import tqdm

            progress = tqdm(total=steps, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                            unit="step", dynamic_ncols=True, leave=True)
        try:
            stats = train_one_epoch(
                train_model, train_loader, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, state=state, steps=steps, accum_steps=accum, device=device, dtype=dtype,
                mixup=mixup, ema=ema, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                channels_last=cfg.channels_last, on_step=step_hook, progress=progress)
        finally:
            if progress is not None:
                progress.close()
        loss_sum, samples = all_reduce_sum([stats["loss_sum"], stats["samples"]], device)
        images_seen += int(samples)
        train_seconds += stats["seconds"]
        metrics = _reduce_eval(evaluate(model, val_loader, device, dtype, cfg.channels_last), device)
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(samples, 1),
            "val_loss": metrics["loss"],
            "val_top1": metrics["top1"],
            "val_top5": metrics["top5"],
            "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": samples / max(stats["seconds"], 1e-9),
        }
        if ema is not None:
            ema_metrics = _reduce_eval(evaluate(ema.module, val_loader, device, dtype, cfg.channels_last), device)
            record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"], ema_loss=ema_metrics["loss"])
        state.history.append(record)
        is_best = metrics["top1"] > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = metrics["top1"], epoch + 1
        state.epoch, state.step_in_epoch = epoch + 1, 0
        logger.log("epoch", state.global_step, **record)
        ema_text = f", EMA top-1 {record['ema_top1']:.2f}" if ema is not None else ""
        logger.print(
            f"[train] epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
            f"val loss {record['val_loss']:.4f}, top-1 {record['val_top1']:.2f}, top-5 {record['val_top5']:.2f}"
            f"{ema_text}, {record['img_per_s']:.0f} img/s"
        )
        save("last.pth")
        if is_best and dist_info.is_main:
            # best.pth: weights only (plus metrics), loadable with --finetune or --eval --finetune
            ckpt_io.atomic_save({"model": model.state_dict(),
                                 "model_ema": ema.module.state_dict() if ema is not None else None,
                                 "epoch": epoch + 1, "val_top1": metrics["top1"], "config": cfg.to_dict()},
                                out_dir / "best.pth")
        last_eval = record
        barrier()

    summary = {
        "model": cfg.model,
        "epochs": cfg.epochs,
        "global_steps": state.global_step,
        "final": last_eval,
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "train_img_per_s": images_seen / max(train_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - start_time,
        "output": str(out_dir),
        "history": state.history,
    }
    if dist_info.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.log("summary", state.global_step, **{k: v for k, v in summary.items() if k != "history"})
        _print_summary(summary, logger)
    return summary


def _resume_path(cfg: TrainConfig, out_dir: Path) -> Optional[Path]:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        path = out_dir / "last.pth"
        return path if path.is_file() else None
    return Path(cfg.resume).expanduser()


# keys that do not change what the run computes (paths, loader plumbing, feedback; batch_size only splits the
# global batch into micro-batches); any other key changed between the checkpoint and the resumed run is reported
_RESUME_NEUTRAL_KEYS = frozenset({
    "resume", "finetune", "eval_only", "output", "experiment", "data_dir", "device", "workers", "pin_memory",
    "persistent_workers", "batch_size", "log_interval", "save_every_steps", "progress", "tensorboard",
})


def _changed_keys(saved: Optional[Dict[str, Any]], cfg: TrainConfig) -> Dict[str, Any]:
    if not isinstance(saved, dict):
        return {}
    now = cfg.to_dict()
    return {k: (saved[k], now[k]) for k in now
            if k not in _RESUME_NEUTRAL_KEYS and k in saved and saved[k] != now[k]}


def _restore(path: Path, model, ema, optimizer, scheduler, scaler, state: TrainState, dist_info: DistInfo,
             logger: RunLogger, cfg: TrainConfig) -> None:
    ckpt = ckpt_io.load_training_checkpoint(path)
    changed = _changed_keys(ckpt.get("config"), cfg)
    if changed:
        # the optimizer and LR-schedule state come from the checkpoint (timm's scheduler state includes its
        # length), so e.g. a larger --epochs does not stretch the schedule; say so rather than drift silently
        logger.print("[train] resume: config differs from the checkpoint's in "
                     + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items())
                     + "; optimizer and LR-schedule state are the checkpoint's, so the run will not match an "
                       "uninterrupted run of either config")
    model.load_state_dict(ckpt["model"])
    if ema is not None:
        if ckpt.get("model_ema") is not None:
            ema.module.load_state_dict(ckpt["model_ema"])
        else:
            ema.module.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    state.epoch = int(ckpt["epoch"])
    state.step_in_epoch = int(ckpt["step_in_epoch"])
    state.global_step = int(ckpt["global_step"])
    state.best_top1 = float(ckpt.get("best_top1", -1.0))
    state.best_epoch = int(ckpt.get("best_epoch", -1))
    state.history = list(ckpt.get("history") or [])
    scheduler.step_update(num_updates=state.global_step)
    rng, why = ckpt_io.split_rng_for_rank(ckpt.get("rng"), dist_info.rank, dist_info.world_size)
    if rng is not None:
        ckpt_io.restore_rng_state(rng)
    else:
        logger.print(f"[train] resume: {why}")
    logger.print(f"[train] resumed from {path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of it, "
                 f"global step {state.global_step}")


def _evaluate_only(cfg: TrainConfig, model, val_loader, dist_info: DistInfo, out_dir: Path, logger: RunLogger,
                   dtype) -> Dict[str, Any]:
    resume_path = _resume_path(cfg, out_dir)
    if cfg.resume == "auto" and resume_path is None and not cfg.finetune:
        raise ConfigError(f"--eval --resume auto: no checkpoint at {out_dir / 'last.pth'}")
    source = resume_path or cfg.finetune
    if not source:
        raise ConfigError("--eval needs weights: pass --resume <last.pth> or --finetune <checkpoint>")
    ema_model = None
    if resume_path is not None:
        ckpt = ckpt_io.load_training_checkpoint(resume_path)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("model_ema") is not None:
            import copy

            ema_model = copy.deepcopy(model)
            ema_model.load_state_dict(ckpt["model_ema"])
    else:
        ckpt_io.load_finetune_weights(model, cfg.finetune)
    device = dist_info.device
    result: Dict[str, Any] = {"model": cfg.model, "weights": str(source)}
    result.update(_reduce_eval(evaluate(model, val_loader, device, dtype, cfg.channels_last), device))
    if ema_model is not None:
        ema = _reduce_eval(evaluate(ema_model, val_loader, device, dtype, cfg.channels_last), device)
        result.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
        ema_text = f" (EMA top-1 {result['ema_top1']:.2f}, top-5 {result['ema_top5']:.2f})" if ema_model else ""
        logger.print(f"[eval] {cfg.model} on {result['images']} images: top-1 {result['top1']:.2f}, "
                     f"top-5 {result['top5']:.2f}, loss {result['loss']:.4f}{ema_text}")
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
        f"  train throughput {summary['train_img_per_s']:.0f} img/s",
        f"  output {summary['output']} (config.yaml, log.jsonl, last.pth, best.pth, summary.json)",
    ]
    logger.print("\n".join(lines))
    sys.stdout.flush()
