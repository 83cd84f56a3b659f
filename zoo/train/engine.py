"""Model, loss, optimiser and precision set-up, and the train / evaluate loops."""
from __future__ import annotations

import contextlib
import difflib
import math
import sys
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

from .config import ConfigError, TrainConfig, TrainingError
from .fsdp import is_sharded

__all__ = [
    "NonFiniteLossError",
    "build_model",
    "check_input_size",
    "build_mixup",
    "build_criterion",
    "build_optimizer_and_scheduler",
    "amp_dtype",
    "TrainState",
    "LossMeter",
    "peak_memory_mb",
    "train_one_epoch",
    "evaluate",
]


class NonFiniteLossError(TrainingError, FloatingPointError):
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
                raise _build_error(cfg, err) from err
            bad = [k for k in kwargs if f"'{k}'" in text]
            which = bad[0] if bad else text
            extra = (" (layer_shuffle_prob is the ShuffleMamba option of the plain Vim models only)"
                     if which == "layer_shuffle_prob" else "")
            raise ConfigError(f"model '{cfg.model}' does not accept the keyword {which!r}{extra}") from err
        except (ValueError, AssertionError, RuntimeError, ZeroDivisionError, IndexError) as err:
            raise _build_error(cfg, err) from err


def _build_error(cfg: TrainConfig, err: BaseException) -> ConfigError:
    given = {k: getattr(cfg, k) for k in ("img_size", "drop_path", "drop", "layer_shuffle_prob")
             if getattr(cfg, k)}
    given.update(cfg.model_kwargs)
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"model '{cfg.model}' cannot be built with {given}: {text}")


def check_input_size(model_fn: Callable[[], nn.Module], cfg: TrainConfig, input_size: Tuple[int, ...]) -> None:
    """Runs the model once on the meta device (no memory, no compute) at the data's input size, so a size
    the architecture cannot take (e.g. --img-size 15 with 16 px patches) fails before the run starts."""
    try:
        with torch.device("meta"):
            probe = model_fn()
            probe.eval()
            with torch.no_grad():
                probe(torch.empty(2, *input_size))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here is the input size's fault or the model's
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model '{cfg.model}' cannot take {input_size[1]}x{input_size[2]} inputs "
                          f"(--img-size {cfg.img_size}): {text}") from err


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
    # the current epoch's loss sum / sample count / seconds so far (carried in mid-epoch checkpoints, so the
    # epoch's train loss after a resume still covers every step of it)
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    epoch_seconds: float = 0.0


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class LossMeter:
    """Running loss sums kept on the device, so a training step never waits for the host.

    Reading (:meth:`sync`, :meth:`read_window`) is the only host sync; the loop does it every ``log_interval`` steps, before a
    checkpoint and at the end of an epoch. A NaN/inf loss anywhere makes the sums non-finite, so every
    read is also the divergence check.
    """

    def __init__(self, device: torch.device, state: TrainState, amp: str = "none"):
        self.state = state
        self.amp = amp
        dtype = _sum_dtype(device)
        self.epoch_sum = torch.tensor(float(state.epoch_loss_sum), dtype=dtype, device=device)
        self.window_sum = torch.zeros((), dtype=dtype, device=device)
        self.window_count = 0
        self.checked_step = state.global_step  # the last step known to be finite

    def add(self, loss: torch.Tensor, count: int) -> None:
        weighted = loss.detach().to(self.epoch_sum.dtype) * count
        self.epoch_sum += weighted
        self.window_sum += weighted
        self.window_count += count
        self.state.epoch_samples += count

    def _fetch(self) -> Tuple[float, float]:
        window, total = torch.stack([self.window_sum, self.epoch_sum]).tolist()
        if not (math.isfinite(window) and math.isfinite(total)):
            hint = "; lower the lr, enable --clip-grad" + (", or try --amp none" if self.amp != "none" else "")
            raise NonFiniteLossError(
                f"loss became {window if not math.isfinite(window) else total} between global step "
                f"{self.checked_step} and {self.state.global_step} (epoch {self.state.epoch}, step "
                f"{self.state.step_in_epoch} of it; amp {self.amp}){hint}. No checkpoint was written after "
                f"step {self.checked_step}")
        self.checked_step = self.state.global_step
        self.state.epoch_loss_sum = total
        return window, total

    def sync(self) -> float:
        """Checks finiteness and brings the epoch's loss sum to the host (before a checkpoint); returns it."""
        return self._fetch()[1]

    def read_window(self) -> float:
        """The mean loss since the last window read (checked like :meth:`sync`); starts a new window."""
        window, _ = self._fetch()
        mean = window / max(self.window_count, 1)
        self.window_sum.zero_()
        self.window_count = 0
        return mean


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, resident host memory otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 2**10)
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return float("nan")


def _clip_gradients(model: nn.Module, clip_grad: Optional[float], clip_mode: str, scaler, optimizer):
    if clip_grad is None:
        return None
    scaler.unscale_(optimizer)
    if clip_mode == "value":
        nn.utils.clip_grad_value_(model.parameters(), clip_grad)
        return None
    return nn.utils.clip_grad_norm_(model.parameters(), clip_grad)  # a device tensor, read at log time


def _host_float(value: torch.Tensor) -> float:
    """A (possibly distributed, e.g. FSDP's gradient norm) scalar tensor as a Python float."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def _optimizer_step(bare: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    scheduler: Scheduler, ema, state: TrainState) -> None:
    """The accumulation window's optimizer step, then the counters, the schedule and the EMA after it."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.step_in_epoch += 1
    scheduler.step_update(num_updates=state.global_step)
    if ema is not None:
        ema.update(bare, step=state.global_step)


def _window_info(meter: LossMeter, optimizer: torch.optim.Optimizer, images: int, start: float, grad_norm,
                 device: torch.device) -> Tuple[Dict[str, Any], float]:
    """What a logging step reports of the window of `images` since `start`, and the time the next one starts.
    The loss read is the host sync, so the clock is read after it: the window's device work is then done."""
    loss = meter.read_window()
    now = time.perf_counter()
    info = {
        "loss": loss,
        "lr": optimizer.param_groups[0]["lr"],
        "img_per_s": images / max(now - start, 1e-9),
        "grad_norm": _host_float(grad_norm) if grad_norm is not None else None,
        "peak_mem_mb": peak_memory_mb(device),
    }
    return info, now


def _show_progress(progress, info: Dict[str, Any]) -> None:
    if progress is None:
        return
    progress.update(1)
    if info:
        progress.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", img_s=f"{info['img_per_s']:.0f}",
                             mem=f"{info['peak_mem_mb']:.0f}MB", refresh=False)


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
    log_interval: int = 1,
    meter: Optional[LossMeter] = None,
    on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
    progress=None,
    skip_batches: int = 0,
) -> Dict[str, float]:
    """Runs optimizer steps ``state.step_in_epoch .. steps`` of the current epoch.

    ``on_step`` gets every step's counters; every ``log_interval`` steps (and at the epoch's last step) it
    also gets the window's mean ``loss``, ``lr``, ``img_per_s`` (this process), ``grad_norm`` and
    ``peak_mem_mb`` -- reading those is the loop's only host sync. Returns this process's loss sum / sample
    count for the whole epoch (the caller reduces over ranks) and its training seconds.
    """
    model.train()
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    bare = model.module if is_ddp else model
    is_fsdp = is_sharded(model)
    meter = meter or LossMeter(device, state, {None: "none", torch.bfloat16: "bf16"}.get(dtype, "fp16"))
    micro = 0
    remaining_micro = (steps - state.step_in_epoch) * accum_steps
    window_start, window_images = time.perf_counter(), 0
    epoch_start, seconds_before = time.perf_counter(), state.epoch_seconds
    grad_norm = None
    for images, targets in loader:
        if skip_batches:  # a streamed epoch resumed mid-way: these batches were trained before the checkpoint
            skip_batches -= 1
            continue
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
        if is_fsdp:  # reduce-scatter the gradients on the accumulation window's last micro-step only
            model.set_requires_gradient_sync(do_step)
        with sync:
            with autocast_context(device, dtype):
                output = model(images)
            loss = criterion(output.float(), targets)
            scaler.scale(loss / accum_steps).backward()
        meter.add(loss, images.shape[0])
        window_images += images.shape[0]
        if not do_step:
            continue
        grad_norm = _clip_gradients(bare, clip_grad, clip_mode, scaler, optimizer)
        _optimizer_step(bare, optimizer, scaler, scheduler, ema, state)
        info: Dict[str, Any] = {}
        if state.global_step % log_interval == 0 or state.step_in_epoch == steps:
            info, window_start = _window_info(meter, optimizer, window_images, window_start, grad_norm, device)
            window_images = 0
        state.epoch_seconds = seconds_before + time.perf_counter() - epoch_start
        _show_progress(progress, info)
        if on_step is not None:
            on_step(info)
    loss_sum = meter.sync()
    state.epoch_seconds = seconds_before + time.perf_counter() - epoch_start
    return {"loss_sum": loss_sum, "samples": state.epoch_samples, "seconds": state.epoch_seconds}


def _lockstep(batches: Iterable, model: nn.Module, device: torch.device, dtype: Optional[torch.dtype],
              input_size: Tuple[int, ...]):
    """The batches of this rank, and then forwards on a dummy image until every rank is done: under FSDP each
    forward gathers parameters from all ranks, so all of them must run the same number of forwards."""
    import torch.distributed as dist

    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is not None:
            yield batch
        else:
            with autocast_context(device, dtype):
                model(torch.zeros((1, *input_size), device=device))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: Optional[torch.dtype],
             channels_last: bool = False, lockstep_input: Optional[Tuple[int, ...]] = None) -> Dict[str, float]:
    """Sums of loss / top-1 / top-5 hits and the image count on this process (reduce over ranks).

    The sums stay on the device until the end (one host sync per evaluation). ``lockstep_input`` (the input
    size, for sharded models): ranks with fewer batches run forwards of that size until all ranks are done."""
    model.eval()
    sums = torch.zeros(3, dtype=_sum_dtype(device), device=device)
    count = 0
    batches = loader if lockstep_input is None else _lockstep(loader, model, device, dtype, lockstep_input)
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, dtype):
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        hits = output.topk(k, dim=1).indices.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(output, targets, reduction="sum"), hits[:, :1].sum(),
                             hits.any(dim=1).sum()]).to(sums.dtype)
        count += targets.shape[0]
    loss_sum, top1, top5 = sums.tolist()
    return {"loss_sum": loss_sum, "top1_hits": top1, "top5_hits": top5, "count": count}
