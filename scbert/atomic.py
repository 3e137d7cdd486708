"""Write a directory or a file atomically: fill a hidden staging copy, then rename it into place.

A crash, an exception or Ctrl-C while the directory is being written leaves the previous version
(if any) intact and no half-written directory under the target name.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
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


# What each kind of directory output holds: the marker file names its kind; an output written
# before the marker existed is recognised by these files (all present).
OUTPUT_KINDS: dict[str, tuple[str, ...]] = {
    "shards": ("manifest.json", "panel.txt"),  # scbert ingest
    "checkpoint": ("config.json", "model.safetensors"),  # save_pretrained, pretrain/finetune --out
    "explanation": ("top_genes.csv", "top_genes.gmt"),  # scbert explain
}
MARKER = ".scbert-output.json"
MARKER_VERSION = 1


class OutputError(ValueError):
    """An output path that would destroy something this project did not write."""


def _describe_protected(path: Path, inputs: Sequence[str | Path]) -> str | None:
    """Why ``path`` may never be replaced, even with overwrite, or None."""
    here = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "it is the root of the file system"
    if path == Path.home().resolve():
        return "it is your home directory"
    if path == here:
        return "it is the current directory"
    if path in here.parents:
        return "it holds the current directory"
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if path == source or path in source.parents:
            return f"it holds the input {given}"
    return None


def output_kind(path: str | Path) -> str | None:
    """The kind of output this project wrote at ``path`` (its marker, or the files of a kind
    written before the marker existed), or None."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        return str(marker["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for kind, files in OUTPUT_KINDS.items():
        if all((path / name).is_file() for name in files):
            return kind
    return None


def check_output(
    target: str | Path, *, kind: str, overwrite: bool = False, inputs: Sequence[str | Path] = ()
) -> None:
    """Refuse an output directory that holds anything this project did not write as ``kind``.

    Replaced freely: an absent path, an empty directory, an earlier output of the same kind.
    With ``overwrite``: anything else, except the root, the home directory, the current
    directory or one of its parents, and the inputs or a directory holding one of them, which
    are never replaced.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}: one of {sorted(OUTPUT_KINDS)}")
    given = Path(target).expanduser()
    for path in {given.resolve(), Path(os.path.abspath(given))}:
        reason = _describe_protected(path, inputs)
        if reason is not None:
            raise OutputError(f"refusing to replace {target}: {reason}; choose another output")
    if not given.exists() and not given.is_symlink():
        return
    if given.is_symlink() or not given.is_dir():
        what = "a symbolic link" if given.is_symlink() else "a file"
    else:
        entries = sorted(p.name for p in given.iterdir())
        found = output_kind(given)
        if not entries or found == kind:
            return
        what = (
            f"scBERT {found}, not {kind}"
            if found
            else f"{len(entries)} entries this project did not write (e.g. {entries[0]})"
        )
    if not overwrite:
        raise OutputError(
            f"{target} exists and holds {what}: choose another output, or add --overwrite "
            "(overwrite=True) to replace it"
        )


@contextmanager
def atomic_directory(
    target: str | Path,
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Iterator[Path]:
    """Yield a staging directory beside ``target``; on success it replaces ``target``.

    ``target`` must be replaceable (``check_output``: checked before and again at the commit);
    the new directory gets a marker file naming its ``kind``, so that the next write recognises
    it as ours. The staging directory follows the umask (mkdtemp would make it 0700). On any
    exception, KeyboardInterrupt included, it is removed and ``target`` is left as it was. An
    existing ``target`` is swapped with the staging directory in one rename where Linux allows
    it (``renameat2``), so ``target`` is never missing; elsewhere, a crash between the two
    renames leaves the previous version beside it as ``.NAME.old-*``.
    """
    target = Path(target)
    check_output(target, kind=kind, overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        yield staging
        _refuse_if_interrupted()
        marker = {"kind": kind, "format_version": MARKER_VERSION}
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
        check_output(target, kind=kind, overwrite=overwrite, inputs=inputs)
        if not (target.exists() or target.is_symlink()):
            os.replace(staging, target)
        elif _exchange(staging, target):
            _remove(staging)  # the previous version, now under the staging name
        else:
            # two renames: a crash between them leaves the previous version under this name
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(target, old)
            os.replace(staging, target)
            _remove(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    that ``b`` names the old or the new version at every instant. False where the system or the
    file system cannot: the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def copy_directory(
    source: str | Path,
    target: str | Path,
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Copy the directory ``source`` to ``target`` atomically, under ``atomic_directory``'s rule:
    the copy fills a sibling staging directory, which then replaces ``target``; a failed or
    interrupted copy leaves ``target`` as it was."""
    with atomic_directory(target, kind=kind, overwrite=overwrite, inputs=inputs) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return Path(target)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``target`` to write; on success it replaces ``target``.

    The temporary name is new (not ``mkstemp``, whose files are 0600), so the file the caller
    creates follows the umask. On any exception it is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target} is a directory: give the path of a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield staging
        _refuse_if_interrupted()
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
