"""The optimisation maths of the training engine against independent oracles (issue 18): the per-step
learning-rate rule written from docs/training.md, EMA written from its definition, gradient accumulation
against one big batch. Tiny linear models whose gradients are known in closed form, so each oracle is a
few lines of arithmetic, not a second copy of the engine."""
from __future__ import annotations

import math

import pytest
import torch
from timm.utils import ModelEmaV3

from _train_data import tiny_run_config, write_imagefolder
from zoo.train import make_config, run
from zoo.train.engine import TrainState, build_optimizer_and_scheduler, train_one_epoch

LR, MIN_LR, WARMUP_LR = 1e-2, 1e-4, 1e-5


def lr_oracle(t: int, total: int, warmup: float) -> float:
    """docs/training.md: linear warm-up from warmup_lr to lr over the first ``warmup`` steps; after it the
    cosine from lr (at step 0) to min_lr (at ``total``) that the warm-up replaced; min_lr after the end."""
    if t < warmup:
        return WARMUP_LR + t * (LR - WARMUP_LR) / warmup
    if t >= total:
        return MIN_LR
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * t / total))


class _Unit(torch.nn.Module):
    """y = x . w with a known gradient: for the loss mean(y) over a batch of ones, dL/dw = 1 for every w."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, n, dtype=torch.float64))  # exact differences

    def forward(self, x):
        return (x * self.w).sum(dim=1, keepdim=True)


def _mean_output(output, target):
    return output.mean()


def _sgd(model, steps: int, epochs: int = 3, warmup_epochs: float = 1.5, **extra):
    cfg = make_config(dict(opt="momentum", momentum=0.0, weight_decay=0.0, lr=LR, min_lr=MIN_LR,
                           warmup_lr=WARMUP_LR, epochs=epochs, warmup_epochs=warmup_epochs, **extra))
    return build_optimizer_and_scheduler(cfg, model, steps)


def _train(model, batches, optimizer, scheduler, steps, accum=1, ema=None, criterion=_mean_output, on_step=None):
    state = TrainState()
    train_one_epoch(model, batches, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                    scaler=torch.amp.GradScaler("cpu", enabled=False), state=state, steps=steps,
                    accum_steps=accum, device=torch.device("cpu"), dtype=None, ema=ema, on_step=on_step)
    return state


def test_lr_used_by_every_step_follows_the_documented_rule():
    """With plain SGD and dL/dw = 1 the update of step k is exactly the lr it used: w_{k-1} - w_k.
    Step k must use the rule's value at t = k - 1 (7 steps per epoch, 3 epochs, 1.5 warm-up epochs: the
    warm-up ends between steps, and the last steps reach min_lr)."""
    steps_per_epoch, epochs = 7, 3
    total = steps_per_epoch * epochs
    model = _Unit()
    optimizer, scheduler = _sgd(model, steps_per_epoch, epochs=epochs)
    weights = [model.w.detach().clone()]
    batches = [(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))] * (total + 3)
    state = TrainState()
    for epoch in range(epochs + 1):  # one epoch past the schedule's end: min_lr
        state.epoch, state.step_in_epoch = epoch, 0
        train_one_epoch(model, batches, criterion=_mean_output, optimizer=optimizer, scheduler=scheduler,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), state=state, steps=steps_per_epoch,
                        accum_steps=1, device=torch.device("cpu"), dtype=None,
                        on_step=lambda info: weights.append(model.w.detach().clone()))
    used = [float((a - b).mean()) for a, b in zip(weights, weights[1:])]
    expected = [lr_oracle(k - 1, total, 1.5 * steps_per_epoch) for k in range(1, len(used) + 1)]
    assert len(used) == total + steps_per_epoch
    for k, (got, want) in enumerate(zip(used, expected), start=1):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), (k, got, want)


def test_lr_in_a_script_run_follows_the_rule(tmp_path):
    """Through run(): the lr reported after each of the 12 steps (log_interval 1) is the rule's value at
    that step (the value the next step uses): 6 steps per epoch, 2 epochs, 0.5 warm-up epochs."""
    data = write_imagefolder(tmp_path / "data")
    seen = []
    values = tiny_run_config(data, tmp_path, "lr", lr=LR, min_lr=MIN_LR, warmup_lr=WARMUP_LR, warmup_epochs=0.5,
                             log_interval=1, ema=False)
    run(make_config(values), on_step=lambda info: seen.append((info["global_step"], info["lr"])))
    assert [k for k, _ in seen] == list(range(1, 13))
    for k, lr in seen:
        assert lr == pytest.approx(lr_oracle(k, 12, 3), rel=1e-9), k


def test_ema_is_updated_once_after_each_optimizer_step():
    """EMA definition: after optimizer step k, ema = decay * ema + (1 - decay) * w_k, the first update
    copying w_1 (timm's ModelEmaV3 with a step count). The oracle is computed from the weights observed after
    each step; an update before the step (or a second one) mixes in the pre-step weights and fails."""
    decay = 0.8
    model = _Unit()
    optimizer, scheduler = _sgd(model, 10, epochs=1, warmup_epochs=0, sched="cosine")
    ema = ModelEmaV3(model, decay=decay)
    observed = []
    batches = [(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))] * 10
    _train(model, batches, optimizer, scheduler, steps=10, ema=ema,
           on_step=lambda info: observed.append(model.w.detach().clone()))
    oracle = observed[0].clone()
    for w in observed[1:]:
        oracle = decay * oracle + (1 - decay) * w
    assert len(observed) == 10 and not torch.allclose(observed[0], observed[-1])
    torch.testing.assert_close(ema.module.w.detach(), oracle, rtol=0, atol=1e-7)


def test_gradient_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 accumulated into each SGD step must give the update of one batch of 8 (the
    mean loss over the 8 samples): a missing or doubled 1/accum scale or an extra step fails."""
    torch.manual_seed(0)
    images = torch.randn(24, 5)
    labels = torch.randint(0, 3, (24,))
    init = torch.nn.Linear(5, 3)

    def trained(batch: int, accum: int) -> torch.nn.Linear:
        model = torch.nn.Linear(5, 3)
        model.load_state_dict(init.state_dict())
        optimizer, scheduler = _sgd(model, 3, epochs=1, warmup_epochs=0)
        batches = [(images[i:i + batch], labels[i:i + batch]) for i in range(0, 24, batch)]
        state = _train(model, batches, optimizer, scheduler, steps=3, accum=accum,
                       criterion=torch.nn.CrossEntropyLoss())
        assert state.global_step == 3
        return model

    big, accumulated = trained(8, 1), trained(2, 4)
    # the oracle for the first step: w - lr * grad of the mean loss over the first 8 samples
    manual = torch.nn.Linear(5, 3)
    manual.load_state_dict(init.state_dict())
    torch.nn.functional.cross_entropy(manual(images[:8]), labels[:8]).backward()
    one_step = torch.nn.Linear(5, 3)
    one_step.load_state_dict(init.state_dict())
    optimizer, scheduler = _sgd(one_step, 3, epochs=1, warmup_epochs=0)
    _train(one_step, [(images[i:i + 2], labels[i:i + 2]) for i in range(0, 8, 2)], optimizer, scheduler,
           steps=1, accum=4, criterion=torch.nn.CrossEntropyLoss())
    lr0 = lr_oracle(0, 3, 0)  # no warm-up: step 1 uses the cosine at t = 0, i.e. lr
    torch.testing.assert_close(one_step.weight.detach(), init.weight.detach() - lr0 * manual.weight.grad,
                               rtol=0, atol=1e-7)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
