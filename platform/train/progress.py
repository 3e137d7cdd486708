"""A training run's progress bar on the driver, fed by the chief worker through a small Ray
actor. (A module of its own, importing nothing heavy: the actor's process imports only this and
Ray, not torch, which a Ray worker process would take seconds of CPU to import.)"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class ProgressBoard:
    """A Ray actor (no CPU) between the chief worker and the driver's progress bar: the worker
    posts its step and metrics without waiting for an answer, the driver collects them."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def post(self, update: dict[str, Any]) -> None:
        self.updates.append(update)

    def collect(self) -> list[dict[str, Any]]:
        updates, self.updates = self.updates, []
        return updates


def board_feed(board: Any, every_s: float = 1.0) -> Callable[[int, int, dict[str, float]], None]:
    """The chief's ``LoopHooks.progress``: a post at most every ``every_s`` seconds, and at
    every validation and the last step."""
    last = -math.inf

    def feed(step: int, total: int, metrics: dict[str, float]) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or step >= total or any(k.startswith("val/") for k in metrics):
            last = now
            board.post.remote({"step": step, **metrics})

    return feed


def _postfix(metrics: dict[str, float]) -> str:
    shown = [f"loss {metrics['train/loss']:.3f}"] if "train/loss" in metrics else []
    if "train/cells_per_s" in metrics:
        shown.append(f"{metrics['train/cells_per_s']:.0f} cells/s")
    for key in ("val/macro_f1", "val/accuracy", "val/masked_acc"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.3f}")
    return ", ".join(shown)


@contextlib.contextmanager
def step_progress(task: str, total_steps: int) -> Iterator[Any]:
    """The driver's progress bar of a training run (steps, loss, cells/s, the latest validation,
    ETA), fed through a ``ProgressBoard`` that this yields for the workers."""
    import ray

    from scbert_platform.console import progress, say

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    bar = progress(total=total_steps, desc=task, unit="step")
    latest: dict[str, float] = {}
    stop = threading.Event()

    def show(updates: list[dict[str, Any]]) -> None:
        for update in updates:
            if "message" in update:
                say(f"{task}: {update['message']}")
                continue
            step = int(update.pop("step"))
            latest.update(update)
            bar.set_postfix_str(_postfix(latest), refresh=False)
            bar.update(step - bar.n)

    def follow() -> None:
        while not stop.wait(1.0):
            try:
                show(ray.get(board.collect.remote(), timeout=30))
            except Exception:  # Ray is going away: the run's own error says why
                return

    thread = threading.Thread(target=follow, name="scbert-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            show(ray.get(board.collect.remote(), timeout=10))
        bar.close()
        with contextlib.suppress(Exception):
            ray.kill(board)
