"""Learning-rate schedules, stepped once per optimiser step.

The published scBERT scripts (``pretrain.py``, ``finetune.py``) use the third-party
``CosineAnnealingWarmupRestarts`` with ``first_cycle_steps=15, cycle_mult=2, max_lr=1e-4,
min_lr=1e-6, warmup_steps=5, gamma=0.9``, stepped once per *epoch*. We keep those numbers as the
defaults but count them in *optimiser steps*, so the schedule does not depend on how many cells an
epoch holds. (With the published batch of 3 x 60 accumulation steps, 15 optimiser steps are 2,700
cells per GPU: set ``first_cycle_steps``/``warmup_steps`` from the run's steps per epoch to get
restarts as rare as the published ones.)

Cosine with warm restarts: cycle ``i`` lasts ``first_cycle_steps * cycle_mult**i`` steps (floored
to an integer). Within a cycle the first ``warmup_steps`` go linearly from ``min_lr`` to the
cycle's peak ``max_lr * gamma**i``, then a half cosine goes from the peak down to ``min_lr`` at the
cycle's end. The peak is clamped at ``min_lr`` (after enough cycles ``gamma**i`` would otherwise
turn the cosine upside down).

Cycle lengths follow that definition: 15, 30, 60 for the published numbers. The published class
(vendored in scBERT's ``utils.py``) computes ``first_cycle_steps * cycle_mult**i`` only when
``step(epoch)`` is given an epoch; the scripts call ``step()`` without one, which grows cycles as
``(length - warmup_steps) * cycle_mult + warmup_steps``, so the published runs had cycles of 15,
25, 45, 85 epochs.

``make_scheduler`` wraps the pure functions in a ``LambdaLR``: the optimiser's lr is the peak, so
its ``state_dict()`` (step counter and base lrs) is all that a checkpoint needs to resume the
schedule exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from scbert_platform.params import SCHEDULES

# The published CosineAnnealingWarmupRestarts arguments (pretrain.py, finetune.py).
PUBLISHED_MAX_LR = 1e-4
PUBLISHED_MIN_LR = 1e-6
PUBLISHED_FIRST_CYCLE_STEPS = 15
PUBLISHED_CYCLE_MULT = 2.0
PUBLISHED_WARMUP_STEPS = 5
PUBLISHED_GAMMA = 0.9


def _check(
    *,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    first_cycle_steps: int | None = None,
    cycle_mult: float | None = None,
    gamma: float | None = None,
) -> None:
    """Raise one ValueError naming every bad argument."""
    bad = []
    if not (math.isfinite(max_lr) and max_lr > 0):
        bad.append(f"max_lr={max_lr} (need > 0)")
    if not (math.isfinite(min_lr) and 0 <= min_lr <= max_lr):
        bad.append(f"min_lr={min_lr} (need 0 <= min_lr <= max_lr)")
    if warmup_steps < 0:
        bad.append(f"warmup_steps={warmup_steps} (need >= 0)")
    if first_cycle_steps is not None:
        if first_cycle_steps < 1:
            bad.append(f"first_cycle_steps={first_cycle_steps} (need >= 1)")
        elif warmup_steps >= first_cycle_steps:
            bad.append(
                f"warmup_steps={warmup_steps} (need < first_cycle_steps={first_cycle_steps})"
            )
    if cycle_mult is not None and not (math.isfinite(cycle_mult) and cycle_mult >= 1):
        bad.append(f"cycle_mult={cycle_mult} (need >= 1)")
    if gamma is not None and not (0 < gamma <= 1):
        bad.append(f"gamma={gamma} (need 0 < gamma <= 1)")
    if bad:
        raise ValueError(f"invalid learning-rate schedule: {', '.join(bad)}")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step={step} (need >= 0)")


def cycle_position(step: int, *, first_cycle_steps: int, cycle_mult: float) -> tuple[int, int, int]:
    """``(cycle, step_in_cycle, cycle_length)`` of a global step (all counted from 0)."""
    _check_step(step)
    if cycle_mult == 1:
        cycle, step_in_cycle = divmod(step, first_cycle_steps)
        return cycle, step_in_cycle, first_cycle_steps
    cycle, start = 0, 0
    length = first_cycle_steps
    while step >= start + length:  # geometric growth: O(log step) iterations
        start += length
        cycle += 1
        length = int(first_cycle_steps * cycle_mult**cycle)
    return cycle, step - start, length


def cosine_warmup_restarts(
    step: int,
    *,
    max_lr: float = PUBLISHED_MAX_LR,
    min_lr: float = PUBLISHED_MIN_LR,
    first_cycle_steps: int = PUBLISHED_FIRST_CYCLE_STEPS,
    cycle_mult: float = PUBLISHED_CYCLE_MULT,
    warmup_steps: int = PUBLISHED_WARMUP_STEPS,
    gamma: float = PUBLISHED_GAMMA,
) -> float:
    """Learning rate at optimiser step ``step`` (0 = the first step) of cosine warm restarts."""
    _check(
        max_lr=max_lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        first_cycle_steps=first_cycle_steps,
        cycle_mult=cycle_mult,
        gamma=gamma,
    )
    cycle, t, length = cycle_position(
        step, first_cycle_steps=first_cycle_steps, cycle_mult=cycle_mult
    )
    peak = max(max_lr * gamma**cycle, min_lr)
    if t < warmup_steps:
        return min_lr + (peak - min_lr) * t / warmup_steps
    # half cosine over the rest of the cycle: peak at t = warmup_steps, min_lr at t = length
    progress = (t - warmup_steps) / (length - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(
    step: int,
    *,
    max_lr: float = PUBLISHED_MAX_LR,
    min_lr: float = PUBLISHED_MIN_LR,
    warmup_steps: int = PUBLISHED_WARMUP_STEPS,
) -> float:
    """Learning rate at ``step``: ``min_lr`` up to ``max_lr`` over ``warmup_steps``, then flat."""
    _check(max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps)
    _check_step(step)
    if step >= warmup_steps:
        return max_lr
    return min_lr + (max_lr - min_lr) * step / warmup_steps


def _schedule(
    kind: str,
    *,
    max_lr: float,
    min_lr: float,
    first_cycle_steps: int,
    cycle_mult: float,
    warmup_steps: int,
    gamma: float,
) -> Callable[[int], float]:
    """The absolute lr(step) of one param group whose peak lr is ``max_lr`` (arguments checked)."""
    lr_of_step: Callable[[int], float]
    if kind == "constant":
        lr_of_step = functools.partial(linear_warmup, max_lr=max_lr, min_lr=0.0, warmup_steps=0)
    elif kind == "linear_warmup":
        lr_of_step = functools.partial(
            linear_warmup, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps
        )
    elif kind == "cosine_restarts":
        lr_of_step = functools.partial(
            cosine_warmup_restarts,
            max_lr=max_lr,
            min_lr=min_lr,
            first_cycle_steps=first_cycle_steps,
            cycle_mult=cycle_mult,
            warmup_steps=warmup_steps,
            gamma=gamma,
        )
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {', '.join(SCHEDULES)}")
    lr_of_step(0)  # validates the arguments now, not at the first scheduler step
    return lr_of_step


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str = "cosine_restarts",
    min_lr: float = PUBLISHED_MIN_LR,
    first_cycle_steps: int = PUBLISHED_FIRST_CYCLE_STEPS,
    cycle_mult: float = PUBLISHED_CYCLE_MULT,
    warmup_steps: int = PUBLISHED_WARMUP_STEPS,
    gamma: float = PUBLISHED_GAMMA,
) -> LRScheduler:
    """A ``LambdaLR`` that follows ``kind``; call ``.step()`` once after each ``optimizer.step()``.

    Each param group's lr at construction is its peak (``max_lr`` of the pure functions), so
    ``Adam(lr=1e-4)`` reproduces the published schedule; ``min_lr`` is absolute and shared by all
    groups. The lr used by optimiser step ``k`` (from 0) is ``lr(k)``: construction sets ``lr(0)``.
    ``kind``: ``"cosine_restarts"`` (published), ``"linear_warmup"`` (``min_lr`` to the peak over
    ``warmup_steps``, then flat) or ``"constant"``. To resume, build the optimiser and the
    scheduler with the same arguments, then ``load_state_dict`` both (the optimiser first).
    """
    lambdas = []
    for group in optimizer.param_groups:
        peak = float(group.get("initial_lr", group["lr"]))
        lr_of_step = _schedule(
            kind,
            max_lr=peak,
            min_lr=min_lr,
            first_cycle_steps=first_cycle_steps,
            cycle_mult=cycle_mult,
            warmup_steps=warmup_steps,
            gamma=gamma,
        )
        lambdas.append(_relative(lr_of_step, peak))
    return _ResumableLambdaLR(optimizer, lr_lambda=lambdas)


def _relative(lr_of_step: Callable[[int], float], peak: float) -> Callable[[int], float]:
    """LambdaLR multiplies the group's base lr by the lambda: lambda = lr(step) / base lr."""
    return lambda step: lr_of_step(step) / peak


class _ResumableLambdaLR(LambdaLR):
    """LambdaLR whose ``load_state_dict`` also sets each group's lr for the restored step.

    The stock one restores the step counter only, so the group lrs stay at ``lr(0)`` until the
    next ``step()`` unless the optimiser state is loaded after the scheduler is built.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        step = self.last_epoch
        lrs = [base * fn(step) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs
