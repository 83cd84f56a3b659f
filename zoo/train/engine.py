"""Model, loss, optimiser and precision set-up, and the train / evaluate loops."""
from __future__ import annotations

import contextlib
import difflib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from .config import ConfigError, TrainConfig

__all__ = [
    "NonFiniteLossError",
    "build_model",
    "build_mixup",
    "build_criterion",
    "build_optimizer_and_scheduler",
    "amp_dtype",
    "TrainState",
    "train_one_epoch",
    "evaluate",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the run stops instead of silently corrupting the weights."""


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """Creates ``cfg.model`` by name (zoo and timm models), passing the recipe's model kwargs."""
    import zoo  # noqa: F401  (registers the zoo families with timm)

    if not timm.is_model(cfg.model):
        family = cfg.model.split("_")[0][:3]
        close = difflib.get_close_matches(cfg.model, timm.list_models(f"{family}*"), n=4, cutoff=0.3)
        close = close or difflib.get_close_matches(cfg.model, timm.list_models(), n=4)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown model '{cfg.model}' (not registered with zoo/timm){hint}")
    kwargs: Dict[str, Any] = dict(cfg.model_kwargs)
    kwargs["num_classes"] = num_classes
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.drop > 0:
        kwargs["drop_rate"] = cfg.drop
    if cfg.layer_shuffle_prob > 0:
        kwargs["layer_shuffle_prob"] = cfg.layer_shuffle_prob
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    while True:
        try:
            return zoo.create_model(cfg.model, **kwargs)
        except TypeError as err:
            text = str(err)
            if "img_size" in kwargs and "img_size" in text and "img_size" not in cfg.model_kwargs:
                # convolutional models take any input size: the data pipeline alone uses img_size; retry
                # without it (another rejected keyword then gets the clear error below)
                kwargs.pop("img_size")
                continue
            if "unexpected keyword" not in text:
                raise
            bad = [k for k in kwargs if f"'{k}'" in text]
            which = bad[0] if bad else text
            extra = (" (layer_shuffle_prob is the ShuffleMamba option of the plain Vim models only)"
                     if which == "layer_shuffle_prob" else "")
            raise ConfigError(f"model '{cfg.model}' does not accept the keyword {which!r}{extra}") from err


def build_mixup(cfg: TrainConfig, num_classes: int) -> Optional[Mixup]:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: TrainConfig, mixup: Optional[Mixup]) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already folds label smoothing into the soft targets
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def build_optimizer_and_scheduler(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int
                                  ) -> Tuple[torch.optim.Optimizer, Scheduler]:
    """timm's AdamW (etc.) with weight decay off for norms, biases and ``model.no_weight_decay()``,
    and a per-iteration cosine schedule with linear warm-up."""
    opt_kwargs: Dict[str, Any] = {"eps": cfg.opt_eps}
    if cfg.opt_betas is not None:
        opt_kwargs["betas"] = tuple(cfg.opt_betas)
    try:
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            layer_decay=cfg.layer_decay, **opt_kwargs,
        )
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"config key 'opt'={cfg.opt!r} could not build an optimizer: {err}") from err
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    if scheduler is None:
        raise ConfigError(f"config key 'sched'={cfg.sched!r} is not a timm scheduler (try cosine)")
    scheduler.step_update(0)
    return optimizer, scheduler


def amp_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    """The autocast dtype for ``cfg.amp`` (None: full fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainState:
    """What the loop carries from step to step (and what a checkpoint records besides the modules)."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in ``epoch``
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    steps: int,
    accum_steps: int,
    device: torch.device,
    dtype: Optional[torch.dtype],
    mixup: Optional[Mixup] = None,
    ema=None,
    clip_grad: Optional[float] = None,
    clip_mode: str = "norm",
    channels_last: bool = False,
    on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
    progress=None,
) -> Dict[str, float]:
    """Runs optimizer steps ``state.step_in_epoch .. steps`` of the current epoch.

    Returns this process's loss sum / sample count (the caller reduces over ranks) and timing.
    """
    model.train()
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    bare = model.module if is_ddp else model
    loss_sum, samples, micro = 0.0, 0, 0
    remaining_micro = (steps - state.step_in_epoch) * accum_steps
    window_start, window_images = time.perf_counter(), 0
    epoch_start = time.perf_counter()
    for images, targets in loader:
        if micro >= remaining_micro:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        micro += 1
        do_step = micro % accum_steps == 0
        sync = contextlib.nullcontext() if (do_step or not is_ddp) else model.no_sync()
        with sync:
            with autocast_context(device, dtype):
                output = model(images)
            loss = criterion(output.float(), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss is {loss_value} at epoch {state.epoch} step {state.step_in_epoch} "
                    f"(amp={dtype}); lower the lr, enable --clip-grad, or try --amp none"
                )
            scaler.scale(loss / accum_steps).backward()
        n = images.shape[0]
        loss_sum += loss_value * n
        samples += n
        window_images += n
        if not do_step:
            continue
        grad_norm = None
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            if clip_mode == "value":
                nn.utils.clip_grad_value_(bare.parameters(), clip_grad)
            else:
                grad_norm = float(nn.utils.clip_grad_norm_(bare.parameters(), clip_grad))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch += 1
        scheduler.step_update(num_updates=state.global_step)
        if ema is not None:
            ema.update(bare, step=state.global_step)
        now = time.perf_counter()
        info = {
            "loss": loss_value,
            "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": window_images / max(now - window_start, 1e-9),
            "grad_norm": grad_norm,
        }
        window_start, window_images = now, 0
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{info['lr']:.2e}",
                                 img_s=f"{info['img_per_s']:.0f}", refresh=False)
        if on_step is not None:
            on_step(info)
    elapsed = time.perf_counter() - epoch_start
    return {"loss_sum": loss_sum, "samples": samples, "seconds": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: Optional[torch.dtype],
             channels_last: bool = False) -> Dict[str, float]:
    """Sums of loss / top-1 / top-5 hits and the image count on this process (reduce over ranks)."""
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0.0, 0.0, 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, dtype):
            output = model(images)
        output = output.float()
        loss_sum += F.cross_entropy(output, targets, reduction="sum").item()
        k = min(5, output.shape[1])
        hits = output.topk(k, dim=1).indices.eq(targets[:, None])
        top1 += hits[:, :1].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += targets.shape[0]
    return {"loss_sum": loss_sum, "top1_hits": top1, "top5_hits": top5, "count": count}
