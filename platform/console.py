"""What a person sees while a verb runs: stage headers, progress bars, and the quiet/verbose switch.

Progress and headers go to stderr, results to stdout. On a terminal a bar is tqdm's, redrawn in
place; anywhere else (CI, ``| tee``, a DVC stage's log) the same text is printed as a plain line
now and then, never as carriage-return redraws. ``--verbose`` (or ``SCBERT_VERBOSE=1``, which
``--verbose`` sets so that child processes and Ray workers see it too) brings back the output of
Ray's workers and the INFO lines of the libraries, which are otherwise kept in the log files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

VERBOSE_ENV = "SCBERT_VERBOSE"

# INFO lines of libraries that say nothing a user acts on; their warnings and errors still show
CHATTY_LOGGERS = (
    "mlflow.store.db.utils",  # "Creating initial MLflow database tables..."
    "mlflow.tracking.fluent",  # "Experiment with name ... does not exist. Creating a new one."
    "alembic.runtime.migration",  # MLflow's schema migrations on a new SQLite store
    "ray.tune.tune",  # "Tune config ... Ray Tune is running with..."
    "ray.tune.tuner",
    "ray.data",  # execution plans and "Dataset ... execution finished" of every epoch
    # Ray Train's "Reporting training result N: TrainingReport(...)" for every report of every
    # worker, and "Checkpoint successfully created at: ..." for every checkpoint
    "ray.train.v2._internal.execution.context",
    "ray.train.v2._internal.execution.storage",
    "ray.serve",  # replica and proxy start-up lines
)


def verbose() -> bool:
    """Whether the user asked for everything (``--verbose`` or ``SCBERT_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """``--verbose``: through the environment, so that child processes and Ray workers see it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_libraries() -> None:
    """Lower the known-harmless chatter of the libraries in this process (not in verbose mode).

    Each silenced message is named where it is silenced, with the reason it is harmless.
    """
    if verbose():
        return
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data warns "Progress bars disabled. To enable, set ..." on every run: they are off on
    # purpose (our bars count the cells and steps)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # MLflow draws a tqdm bar (at ~16,000 it/s) for every artifact download of a few kB
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray Data warns on every run that ExecutionOptions.exclude_resources, which Ray Train itself
    # sets, is deprecated: nothing in this project sets it
    warnings.filterwarnings("ignore", message=".*exclude_resources.*is deprecated")


@contextlib.contextmanager
def quieter(logger: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise one logger's level for a block (unless verbose); the caller says why it is safe."""
    log = logging.getLogger(logger)
    before = log.level
    if not verbose():
        log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


def one_line_warnings() -> None:
    """Python warnings as ``warning: message`` lines, without the source line that raised them
    (a user reads what is wrong; ``--verbose`` keeps Python's format)."""
    if verbose():
        return

    def short(message: Any, category: Any, filename: str, lineno: int, line: Any = None) -> str:
        return f"warning: {message}\n"

    warnings.formatwarning = short


def header(title: str, *, file: TextIO | None = None) -> None:
    """A stage header on stderr: ``== title ==``."""
    print(f"== {title} ==", file=file or sys.stderr, flush=True)


def say(message: str, *, file: TextIO | None = None) -> None:
    """One line of progress news on stderr that does not break a bar being drawn."""
    tqdm.write(message, file=file or sys.stderr)


class _Lines:
    """A file for tqdm that turns its in-place redraws into whole lines (non-interactive)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _size(stream: TextIO) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return size.columns, size.lines


class Progress(tqdm):  # type: ignore[type-arg]
    """tqdm on a terminal; elsewhere a plain line every ``every_s`` seconds and about every
    quarter of the total (whichever comes later), plus the first and the last."""

    monitor_interval = 0  # no monitor thread: it would force redraws every 10 s in line mode

    def __init__(
        self,
        *args: Any,
        file: TextIO | None = None,
        every_s: float = 20.0,
        **kwargs: Any,
    ) -> None:
        stream = file or sys.stderr
        self.plain = not stream.isatty()
        if self.plain:
            total = kwargs.get("total")
            kwargs.setdefault("mininterval", every_s)
            kwargs.setdefault("miniters", max(1, int(total) // 4) if total else 1)
            kwargs.setdefault("ncols", 120)
            kwargs["ascii"] = True
            kwargs["bar_format"] = kwargs.get("bar_format") or (
                "{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%) "
                "[{elapsed}<{remaining}, {rate_fmt}]{postfix}"
                if total
                else "{desc}: {n_fmt} {unit}s [{elapsed}, {rate_fmt}]{postfix}"
            )
            stream = _Lines(stream)  # type: ignore[assignment]
        elif 0 in _size(stream):  # a terminal that reports no size (a bare pty): tqdm would
            kwargs["dynamic_ncols"] = False  # draw nothing at width or height 0
            kwargs.setdefault("ncols", 100)
            kwargs.setdefault("nrows", 20)
        super().__init__(*args, file=stream, **kwargs)

    def redraw(self) -> None:
        """Show a new postfix now on a terminal; in line mode it waits for the next line."""
        if not self.plain:
            self.refresh()

    def close(self) -> None:
        if self.plain and not self.disable and self.last_print_n == self.n:
            self.leave = False  # the last line printed already shows where it ended
        super().close()


def progress(
    total: float | None = None,
    *,
    desc: str,
    unit: str,
    disable: bool = False,
    every_s: float = 20.0,
    **kwargs: Any,
) -> Progress:
    """A progress bar on stderr (see ``Progress``)."""
    return Progress(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        every_s=every_s,
        dynamic_ncols=sys.stderr.isatty(),
        **kwargs,
    )
