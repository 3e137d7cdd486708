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


def checkpoint(path: Path, text: str) -> Path:
    """A directory that ``check_output`` recognises as a checkpoint, holding ``text``."""
    path.mkdir(parents=True)
    for name in atomic.OUTPUT_KINDS["checkpoint"]:
        (path / name).write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "part").write_text(text)
    return path


def tree(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): p.read_text()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != atomic.MARKER
    }


def test_copy_directory_replaces_an_earlier_copy_in_one_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = checkpoint(tmp_path / "a", "first"), checkpoint(tmp_path / "b", "second")
    target = tmp_path / "out" / "model"
    atomic.copy_directory(first, target, kind="checkpoint")
    assert tree(target) == tree(first)
    renames: list[tuple[str, str]] = []
    replace = os.replace

    def spy(a: str | Path, b: str | Path) -> None:
        renames.append((Path(a).name, Path(b).name))
        replace(a, b)

    monkeypatch.setattr(atomic.os, "replace", spy)
    atomic.copy_directory(second, target, kind="checkpoint")
    assert tree(target) == tree(second)
    assert atomic.output_kind(target) == "checkpoint"
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # nothing left beside it
    probe = [tmp_path / "p", tmp_path / "q"]
    for path in probe:
        path.mkdir()
    if atomic._exchange(*probe):  # Linux: one swap, so the target is never missing, not briefly
        assert renames == []


def test_a_failed_copy_leaves_the_previous_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = checkpoint(tmp_path / "a", "first"), checkpoint(tmp_path / "b", "second")
    target = tmp_path / "out"
    atomic.copy_directory(first, target, kind="checkpoint")
    before = tree(target)

    def copy_then_fail(source: Path, staging: Path, **_: object) -> None:
        (Path(staging) / "config.json").write_text("half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(atomic.shutil, "copytree", copy_then_fail)
        with pytest.raises(OSError, match="No space"):
            atomic.copy_directory(second, target, kind="checkpoint")
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no staging left


def test_without_an_atomic_swap_two_renames_replace_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = checkpoint(tmp_path / "a", "first"), checkpoint(tmp_path / "b", "second")
    target = tmp_path / "out"
    atomic.copy_directory(first, target, kind="checkpoint")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # not Linux, or no renameat2
    atomic.copy_directory(second, target, kind="checkpoint")
    assert tree(target) == tree(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]
