"""What a person sees: progress as plain lines where no terminal is, the quiet/verbose switch,
a failure's worker lines. (A local Ray listens on loopback only: tests/test_tune.py samples a
sweep's, tests/test_serve.py a service's.) A training verb's screen:
quiet by default in tests/test_dvc.py (the pipeline's stages), with ``--verbose`` in
tests/test_train_ray.py (a resumed run)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pytest
from conftest import noise_in


def test_a_bar_without_a_terminal_prints_a_few_whole_lines() -> None:
    from scbert_platform.console import progress

    out = io.StringIO()  # not a terminal, like CI or `| tee`
    with progress(total=100, desc="pretrain", unit="step", every_s=0, file=out) as bar:
        for step in range(100):
            bar.set_postfix_str(f"loss {1 / (step + 1):.3f}", refresh=False)
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("pretrain: 0/100 steps (0%)")
    assert lines[-1].startswith("pretrain: 100/100 steps (100%)") and "loss 0.010" in lines[-1]
    assert 3 <= len(lines) <= 6  # the first, about every quarter, the last; not one per step


def test_a_bar_of_unknown_length_and_a_disabled_one() -> None:
    from scbert_platform.console import progress

    out = io.StringIO()
    with progress(desc="ingest", unit="cell", every_s=0, file=out) as bar:
        bar.update(500)
    assert out.getvalue().splitlines()[-1].startswith("ingest: 500 cells")
    silent = io.StringIO()
    with progress(total=3, desc="x", unit="step", disable=True, file=silent) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_verbose_switch_and_one_line_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from scbert_platform import console

    monkeypatch.setenv(console.VERBOSE_ENV, "")  # recorded: set_verbose's change is undone too
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    assert not console.verbose()
    console.one_line_warnings()
    text = warnings.formatwarning(UserWarning("2 genes get zero vectors"), UserWarning, "f.py", 3)
    assert text == "warning: 2 genes get zero vectors\n"
    console.set_verbose(True)  # what --verbose does: child processes and Ray workers see it
    assert os.environ[console.VERBOSE_ENV] == "1" and console.verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose()


def test_an_unexpected_failure_shows_the_failing_workers_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failure whose cause is in a Ray worker's log: the traceback, then that worker's last
    lines and the session's log folder, exit code 1 (expected errors stay one line, exit 2)."""
    from scbert_platform import cli, cluster

    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-aaa-01.err").write_text("nothing wrong here\n")
    (logs / "worker-bbb-02.err").write_text(
        "step 1/4\nTraceback (most recent call last):\n  File 'loop.py'\nValueError: the cause\n"
    )
    os.utime(logs / "worker-aaa-01.err", (1, 1))  # the older one
    monkeypatch.setattr(cluster, "_session_logs", logs)

    def fails(args: object) -> int:
        raise RuntimeError("Training failed due to worker errors")

    monkeypatch.setattr(cli, "cmd_fetch", fails)
    assert cli.main(["fetch", "pbmc68k_reduced", "--out", str(tmp_path / "x.h5ad")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: Training failed due to worker errors" in err
    assert f"last lines of the failing Ray worker ({logs / 'worker-bbb-02.err'})" in err
    assert "  ValueError: the cause" in err and f"all logs: {logs}" in err
    assert "nothing wrong here" not in err and "--verbose" in err


@pytest.mark.ray
def test_a_ray_data_job_on_the_driver_prints_nothing(
    ray_local: object, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ray Data in the driver (ingest and annotate --distributed use it): no execution plans,
    progress logs or notice that its bars are off."""
    import ray.data

    capfd.readouterr()
    assert len(ray.data.range(300).map_batches(lambda batch: batch).take_all()) == 300
    out, err = capfd.readouterr()
    assert noise_in(out + err) == [] and "Progress" not in err and "Dataset" not in err, err
