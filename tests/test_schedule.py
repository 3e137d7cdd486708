"""The learning-rate schedule: published cosine warm restarts, counted in optimiser steps."""

from __future__ import annotations

import io
import math
import re
from typing import Any

import pytest
import torch

from scbert_platform.train.schedule import (
    cosine_warmup_restarts,
    cycle_position,
    linear_warmup,
    make_scheduler,
)

PUBLISHED: dict[str, Any] = {
    "max_lr": 1e-4,
    "min_lr": 1e-6,
    "first_cycle_steps": 15,
    "cycle_mult": 2.0,
    "warmup_steps": 5,
    "gamma": 0.9,
}


def lr(step: int, **overrides: Any) -> float:
    return cosine_warmup_restarts(step, **{**PUBLISHED, **overrides})


def optimizer(lr: float = 1e-4, n_groups: int = 1) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for _ in range(n_groups)]
    return torch.optim.Adam(groups, lr=lr)


def run(scheduler: torch.optim.lr_scheduler.LRScheduler, n_steps: int) -> list[float]:
    """The lr each of ``n_steps`` optimiser steps uses, stepping as a training loop does."""
    lrs = []
    for _ in range(n_steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_defaults_are_the_published_arguments() -> None:
    assert [cosine_warmup_restarts(s) for s in range(100)] == [lr(s) for s in range(100)]


def test_warmup_starts_at_min_lr_and_reaches_max_lr() -> None:
    assert lr(0) == pytest.approx(1e-6)
    warmup = [lr(s) for s in range(6)]
    assert warmup == pytest.approx([1e-6 + (1e-4 - 1e-6) * s / 5 for s in range(6)])
    assert lr(5) == pytest.approx(1e-4)
    assert max(lr(s) for s in range(15)) == pytest.approx(1e-4)


def test_cosine_reaches_min_lr_at_cycle_end() -> None:
    # the cosine covers steps 5..15 of the first cycle; step 15 would be its end (= min_lr)
    assert lr(10) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)  # half way
    assert lr(14) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr(14) < 0.04 * 1e-4
    # a long cycle's last step is within a hair of min_lr
    assert lr(999, first_cycle_steps=1000) == pytest.approx(1e-6, rel=1e-3)
    decreasing = [lr(s) for s in range(5, 15)]
    assert decreasing == sorted(decreasing, reverse=True)


def test_cycle_lengths_double_and_peaks_decay_by_gamma() -> None:
    starts = [0, 15, 45, 105]  # lengths 15, 30, 60
    for cycle, start in enumerate(starts):
        assert cycle_position(start, first_cycle_steps=15, cycle_mult=2) == (
            cycle,
            0,
            15 * 2**cycle,
        )
        assert lr(start) == pytest.approx(1e-6)  # each cycle restarts its warm-up at min_lr
        assert lr(start + 5) == pytest.approx(1e-4 * 0.9**cycle)  # the cycle's peak
    assert cycle_position(44, first_cycle_steps=15, cycle_mult=2) == (1, 29, 30)
    assert cycle_position(104, first_cycle_steps=15, cycle_mult=2) == (2, 59, 60)
    # second cycle: cosine over 25 steps after the warm-up
    assert lr(15 + 5 + 12) == pytest.approx(
        1e-6 + (0.9e-4 - 1e-6) * 0.5 * (1 + math.cos(0.48 * math.pi))
    )


def test_equal_cycles_with_cycle_mult_one() -> None:
    one = {"cycle_mult": 1.0}
    for step in range(15):
        for cycle in range(1, 4):
            peak = max(1e-4 * 0.9**cycle, 1e-6)
            expected = 1e-6 + (peak - 1e-6) / (1e-4 - 1e-6) * (lr(step, **one) - 1e-6)
            assert lr(step + 15 * cycle, **one) == pytest.approx(expected)
    assert cycle_position(10**9, first_cycle_steps=15, cycle_mult=1) == (*divmod(10**9, 15), 15)


def test_peak_never_falls_below_min_lr() -> None:
    # gamma**cycle * max_lr drops under min_lr after 44 cycles; the lr then stays at min_lr
    late = [lr(s, cycle_mult=1.0) for s in range(15 * 50, 15 * 51)]
    assert late == pytest.approx([1e-6] * 15)


def test_linear_warmup() -> None:
    assert [linear_warmup(s, max_lr=1.0, min_lr=0.0, warmup_steps=4) for s in range(6)] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
    ]
    assert linear_warmup(0, max_lr=1.0, min_lr=0.5, warmup_steps=0) == 1.0


def test_lambda_scheduler_reproduces_the_function_over_200_steps() -> None:
    scheduler = make_scheduler(
        optimizer(1e-4), **{k: v for k, v in PUBLISHED.items() if k != "max_lr"}
    )
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert run(scheduler, 200) == pytest.approx([lr(s) for s in range(200)], rel=1e-12)


def test_groups_peak_at_their_own_lr() -> None:
    opt = optimizer(1e-4, n_groups=2)
    opt.param_groups[1]["lr"] = 1e-3
    scheduler = make_scheduler(opt)
    for _ in range(7):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr(7))
    assert opt.param_groups[1]["lr"] == pytest.approx(lr(7, max_lr=1e-3))


@pytest.mark.parametrize("kind", ["cosine_restarts", "linear_warmup", "constant"])
@pytest.mark.parametrize("load_optimizer", [True, False])
def test_state_dict_resumes_identically(kind: str, load_optimizer: bool) -> None:
    opt = optimizer()
    scheduler = make_scheduler(opt, kind=kind, first_cycle_steps=10, warmup_steps=3)
    full = run(scheduler, 60)

    opt = optimizer()
    scheduler = make_scheduler(opt, kind=kind, first_cycle_steps=10, warmup_steps=3)
    first = run(scheduler, 23)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    opt = optimizer()  # a fresh process: same arguments, then the saved states
    scheduler = make_scheduler(opt, kind=kind, first_cycle_steps=10, warmup_steps=3)
    if load_optimizer:
        opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["sched"])
    assert scheduler.get_last_lr() == pytest.approx([full[23]], rel=1e-12)
    assert first + run(scheduler, 37) == pytest.approx(full, rel=1e-12)


def test_constant_and_linear_warmup_schedulers() -> None:
    assert run(make_scheduler(optimizer(3e-4), kind="constant"), 5) == pytest.approx([3e-4] * 5)
    warm = run(make_scheduler(optimizer(1e-4), kind="linear_warmup", min_lr=0.0, warmup_steps=4), 6)
    assert warm == pytest.approx([0.0, 0.25e-4, 0.5e-4, 0.75e-4, 1e-4, 1e-4])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"max_lr": 0.0}, "max_lr=0.0"),
        ({"max_lr": float("nan")}, "max_lr=nan"),
        ({"min_lr": -1e-6}, "min_lr"),
        ({"min_lr": 1e-3}, "min_lr"),
        ({"warmup_steps": 15}, "warmup_steps=15"),
        ({"warmup_steps": -1}, "warmup_steps=-1"),
        ({"first_cycle_steps": 0}, "first_cycle_steps=0"),
        ({"cycle_mult": 0.5}, "cycle_mult=0.5"),
        ({"gamma": 0.0}, "gamma=0.0"),
        ({"gamma": 1.5}, "gamma=1.5"),
    ],
)
def test_bad_arguments_raise(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        lr(0, **overrides)
    if math.isnan(overrides.get("max_lr", 0.0)):
        return  # torch.optim.Adam refuses it itself
    scheduler_args = {k: v for k, v in {**PUBLISHED, **overrides}.items() if k != "max_lr"}
    with pytest.raises(ValueError, match=re.escape(match)):
        make_scheduler(optimizer(overrides.get("max_lr", 1e-4)), **scheduler_args)


def test_bad_kind_and_step_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule kind 'cosine'.*cosine_restarts"):
        make_scheduler(optimizer(), kind="cosine")
    with pytest.raises(ValueError, match="step=-1"):
        lr(-1)
    with pytest.raises(ValueError, match=r"max_lr=0\.0"):
        make_scheduler(optimizer(0.0), kind="constant")
    with pytest.raises(ValueError, match="min_lr"):
        make_scheduler(optimizer(1e-4), kind="linear_warmup", min_lr=1.0)
