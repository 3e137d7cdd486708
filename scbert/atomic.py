"""Write a directory or a file atomically: fill a hidden staging copy, then rename it into place.

A crash, an exception or Ctrl-C while the directory is being written leaves the previous version
(if any) intact and no half-written directory under the target name.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_INTERRUPTED = threading.Event()


def note_interrupts() -> None:
    """Remember every Ctrl-C (SIGINT), then raise KeyboardInterrupt as Python does. A library can
    swallow that exception (one raised inside a finaliser or a callback is only printed); the
    commit of an atomic write then still refuses to replace the target. Call it once, from the
    main thread of a command-line program."""

    def handler(signum: int, frame: Any) -> None:
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def interrupted() -> bool:
    """Whether a Ctrl-C arrived since ``note_interrupts`` (even one a library swallowed)."""
    return _INTERRUPTED.is_set()


def _refuse_if_interrupted() -> None:
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside ``target``; on success it replaces ``target``.

    The staging directory follows the umask (mkdtemp would make it 0700). On any exception,
    KeyboardInterrupt included, it is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        yield staging
        _refuse_if_interrupted()
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``target`` to write; on success it replaces ``target``.

    The temporary name is new (not ``mkstemp``, whose files are 0600), so the file the caller
    creates follows the umask. On any exception it is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield staging
        _refuse_if_interrupted()
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
