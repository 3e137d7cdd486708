"""What a person sees: progress as plain lines where no terminal is, the quiet/verbose switch,
a local Ray that listens on loopback only, a failure's worker lines. A training verb's screen:
quiet by default in tests/test_dvc.py (the pipeline's stages), with ``--verbose`` in
tests/test_train_ray.py (a resumed run)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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


LOOPBACK_PROBE = """
import json, os, sys, threading
import ray, ray.data
from conftest import non_loopback_listeners, tiny_params
from scbert_platform.cluster import start_ray
from scbert_platform.train.distributed import fit

start_ray(num_cpus=2)

@ray.remote
def pid():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
ray.get([pid.remote() for _ in range(3)] + [actor.pid.remote()])
ray.data.range(100).map_batches(lambda batch: batch).take_all()
exposed, most, done = set(), [0], threading.Event()

def sample():  # while a Ray Train run (controller, worker, Ray Data actors) is going
    import psutil
    while not done.wait(1.0):  # listeners live for the whole run: a sample a second sees them
        exposed.update(non_loopback_listeners())
        most[0] = max(most[0], sum(
            c.status == psutil.CONN_LISTEN
            for p in [psutil.Process(), *psutil.Process().children(recursive=True)]
            for c in p.net_connections(kind="inet")
        ))

sampler = threading.Thread(target=sample)
sampler.start()
try:
    fit("pretrain", sys.argv[1], tiny_params("runs", max_steps=3, val_every=3, ckpt_every=3))
finally:
    done.set()
    sampler.join()
exposed.update(non_loopback_listeners())
print(json.dumps({
    "node_ip": ray.util.get_node_ip_address(),
    "listening": most[0],
    "exposed": sorted(exposed),
}))
"""


@pytest.mark.ray
def test_a_local_ray_listens_on_loopback_only(pbmc_shards: Path, tmp_path: Path) -> None:
    """A Ray started by the project (GCS, raylet, agents, task and actor workers, a Ray Data
    job, then a Ray Train run): every listening socket of every one of its processes, sampled
    while they run, is on 127.0.0.1."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("RAY_ADDRESS", None)
    probe = subprocess.run(
        [sys.executable, "-c", LOOPBACK_PROBE, str(pbmc_shards)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.splitlines()[-1])
    assert found["node_ip"] == "127.0.0.1"
    assert found["listening"] >= 10  # GCS, raylet, agents, workers...: the check saw them
    assert found["exposed"] == []
    assert noise_in(probe.stderr) == [], probe.stderr  # no token-auth notice, no worker lines


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
