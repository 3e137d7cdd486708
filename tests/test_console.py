"""What a person sees: progress as plain lines where no terminal is, the quiet/verbose switch, a
local Ray that listens on loopback only, and a training verb's screen with and without
``--verbose``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import noise_in, tiny_params


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
import json, os
import ray, ray.data
from conftest import non_loopback_listeners
from scbert_platform.cluster import start_ray

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
import psutil
listening = sum(
    c.status == psutil.CONN_LISTEN
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]
    for c in p.net_connections(kind="inet")
)
print(json.dumps({
    "node_ip": ray.util.get_node_ip_address(),
    "listening": listening,
    "exposed": non_loopback_listeners(),
}))
"""


@pytest.mark.ray
def test_a_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """A Ray started by the project (GCS, raylet, agents, task and actor workers, a Ray Data
    job): every listening socket of every one of its processes is on 127.0.0.1."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("RAY_ADDRESS", None)
    probe = subprocess.run(
        [sys.executable, "-c", LOOPBACK_PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.splitlines()[-1])
    assert found["node_ip"] == "127.0.0.1"
    assert found["listening"] >= 5  # GCS, raylet, workers...: the check saw them
    assert found["exposed"] == []
    assert noise_in(probe.stderr) == [], probe.stderr  # no token-auth notice, no worker lines


@pytest.mark.ray
def test_verbose_brings_the_workers_output_back(pbmc_shards: Path, workdir: Path) -> None:
    """``--verbose`` shows what the Ray workers print, which a default run keeps in the log
    files (the quiet default is checked on the pipeline's own stages in tests/test_dvc.py); the
    step bar and the result are there either way."""
    tiny_params(workdir / "runs", max_steps=3, val_every=3, ckpt_every=3).dump("params.yaml")
    loud = subprocess.run(
        [sys.executable, "-m", "scbert_platform.cli", "--verbose", "pretrain", str(pbmc_shards)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert loud.stdout.startswith("pretrain pretrain-") and "3 steps; train/loss" in loud.stdout
    assert "pretrain: 3/3 steps (100%)" in loud.stderr
    assert "(RayTrainWorker" in loud.stderr and "step 1/3" in loud.stderr
