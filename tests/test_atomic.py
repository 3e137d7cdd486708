"""Atomic writes: a Ctrl-C stops the commit even when a library swallowed the KeyboardInterrupt."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from scbert import atomic


@pytest.fixture
def noted() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    atomic.note_interrupts()
    yield
    signal.signal(signal.SIGINT, previous)
    atomic._INTERRUPTED.clear()


def test_a_swallowed_ctrl_c_still_refuses_the_commit(tmp_path: Path, noted: None) -> None:
    target = tmp_path / "out"
    with atomic.atomic_directory(target, kind="shards") as staging:
        (staging / "a").write_text("first")
    assert not atomic.interrupted()
    with (
        pytest.raises(KeyboardInterrupt),
        atomic.atomic_directory(target, kind="shards") as staging,
    ):
        (staging / "a").write_text("second")
        with contextlib.suppress(KeyboardInterrupt):  # a library that catches everything
            os.kill(os.getpid(), signal.SIGINT)
    assert atomic.interrupted()
    assert (target / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
    with pytest.raises(KeyboardInterrupt), atomic.atomic_file(tmp_path / "f.txt") as path:
        path.write_text("x")
    assert not (tmp_path / "f.txt").exists()
