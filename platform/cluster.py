"""Starting (or joining) Ray the same way everywhere: ingest, training, sweeps, CV, serving, tests.

Ray is joined when already initialised (a notebook's ``ray.init(address=...)``, a Tune trial) or
when an address is given (``address=``, ``RAY_ADDRESS``; ``auto`` for the cluster a ``ray start``
on this machine began): the cluster keeps its own addressing. Otherwise a new local Ray starts
(never a silent join of whatever cluster runs on the machine) that

- listens on loopback only: its node address is 127.0.0.1, and Ray's servers (GCS, raylet,
  workers, agents) bind that address. On Linux Ray replaces 127.0.0.1 by the machine's
  outward address unless its single-machine mode is on (the default on macOS and Windows,
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which this module turns on for the Ray it starts;
- keeps token authentication (Ray's default for a new local cluster) without the notice Ray
  prints about it on every start;
- keeps the workers' output in the session's log files (``log_to_driver`` off), unless
  ``--verbose`` / ``SCBERT_VERBOSE=1``; ``logs_dir()`` says where they are;
- runs without the dashboard. Ray Train's placement-group cleaner asks the state API (served by
  the dashboard) every few seconds whether its controller is alive, and without a dashboard it
  logs a warning each time; ``quiet_worker_logs`` runs in every worker process, raises that
  logger's level and lowers the libraries' chatter (``console.quiet_libraries``), so what a
  worker logs stays readable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray Serve's proxy reads its middlewares' import path from its environment when it starts
# (scbert_serve/proxy.py: a request whose replica died gets 503 + Retry-After, not a bare 500)
SERVE_PROXY_ENV = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "scbert_serve.proxy:middlewares")
# Ray Train's controller polls its workers every 2 s by default (sized for large clusters): each
# checkpoint and the end of a run wait for a poll. On a machine of its own a local Ray polls every
# 0.25 s, which took 5-6 s off each short fine-tuning run here (34 -> 28 s, bench/RESULTS.md).
# Inherited by Ray's processes and passed on by Ray Train to its controller.
TRAIN_POLL_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a preemption watcher per run (an actor polling Ray for nodes being drained, as
# a cloud's spot nodes are); a local Ray has none to drain, and the actor's process cost each
# run ~2.5 CPU-seconds here
PREEMPTION_ENV = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
_session_logs: Path | None = None  # the log folder of the Ray that start_ray last joined
_started: bool = False  # whether start_ray started that Ray (rather than joined one)

# without the dashboard, a warning every few seconds that the state API does not answer
NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """The ``worker_process_setup_hook`` of the Ray this module starts."""
    from scbert_platform.console import quiet_libraries, verbose

    if verbose():
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_libraries()


def joins_cluster(init: dict[str, Any]) -> bool:
    """Whether ``init`` (or ``RAY_ADDRESS``) names a cluster to join rather than a local Ray."""
    return (init.get("address") or os.environ.get("RAY_ADDRESS") or "local") != "local"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts, its single-machine mode: the node address is 127.0.0.1, in this process
    and in the processes Ray starts (they inherit the environment). Restored afterwards, so that
    a later ``ray.init(address=...)`` in this process joins a cluster by its own address."""
    from ray._private import ray_constants

    variable = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable] = "0"  # read by Ray's processes when they import ray
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported ray already
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before[0]
        ray_constants.ENABLE_RAY_CLUSTER = before[1]


def start_ray(**init: Any) -> float:
    """Join or start Ray (``init``: extra ``ray.init`` arguments); the cluster's CPUs."""
    import ray
    import ray.data

    from scbert_platform.console import quiet_libraries, verbose

    # after importing Ray Data, which sets up its loggers (at INFO) when it is first imported
    quiet_libraries()
    # Ray Data's per-operator bars and progress logs only on request (on a terminal): our own
    # bars count the steps and cells
    ray.data.DataContext.get_current().enable_progress_bars = verbose() and sys.stderr.isatty()
    if not ray.is_initialized():
        runtime_env = {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"}
        local = not joins_cluster(init)
        if local:
            # "local": a new Ray of its own, even where ray.init() would join the cluster a
            # `ray start` on this machine left in /tmp/ray/ray_current_cluster (join one with
            # --address or RAY_ADDRESS)
            init["address"] = "local"
            init.setdefault("_node_ip_address", LOOPBACK)
            # Ray turns token authentication on for a new local cluster (kept: the ports are
            # loopback, but other users of the machine can reach loopback too) and announces it
            # on every start; the announcement alone is silenced
            if not verbose():
                logging.getLogger(AUTH_LOGGER).setLevel(logging.ERROR)
            # The raylet warns once a node has started 4x this many Python workers ("This could
            # be a result of using a large number of actors..."). Its default is the node's CPU
            # count, and on a laptop a sweep's Tune, Train and Data actors pass 4x 2 CPUs by
            # design; 8 workers may start at once instead of 2, which is not a problem here.
            init.setdefault("_system_config", {"worker_maximum_startup_concurrency": 8})
            # the raylet, hence Serve's proxy, inherits this process's environment
            os.environ.setdefault(*SERVE_PROXY_ENV)
            os.environ.setdefault(*TRAIN_POLL_ENV)
            os.environ.setdefault(*PREEMPTION_ENV)
        init.setdefault("log_to_driver", verbose())
        global _started
        _started = local
        with _loopback_only() if local else contextlib.nullcontext():
            ray.init(
                include_dashboard=False,
                configure_logging=False,
                runtime_env=init.pop("runtime_env", None) or runtime_env,
                **init,
            )
    global _session_logs
    _session_logs = logs_dir()
    return float(ray.cluster_resources().get("CPU", 0))


def logs_dir() -> Path | None:
    """The running Ray session's log folder on this machine (workers' stdout/stderr, Ray's own
    logs), or None when Ray is not running here."""
    import ray

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    session = node.get_session_dir_path() if node is not None else None
    return Path(session, "logs") if session else None


def started_here() -> bool:
    """Whether the running Ray is a local one that ``start_ray`` started in this process."""
    import ray

    return _started and ray.is_initialized()


def session_logs() -> Path | None:
    """The log folder of the Ray session ``start_ray`` last started or joined in this process."""
    return _session_logs


def failure_report(n_lines: int = 20) -> str | None:
    """After a failure: the last lines of the Ray worker that logged an error most recently,
    and where all the logs of the Ray session are (None when no Ray ran in this process)."""
    logs = _session_logs
    if logs is None or not logs.is_dir():
        return None
    errs = sorted(logs.glob("worker-*.err"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in errs[:50]:
        lines = path.read_text(errors="replace").splitlines()
        if any("Traceback" in line or "Error" in line for line in lines):
            tail = "\n".join(f"  {line}" for line in lines[-n_lines:])
            return f"last lines of the failing Ray worker ({path}):\n{tail}\nall logs: {logs}"
    return f"the logs of the Ray workers: {logs}"
