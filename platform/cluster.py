"""Starting (or joining) Ray the same way everywhere: ingest, training, sweeps, CV, tests.

Ray is joined when already initialised (a notebook's ``ray.init(address=...)``, a Tune trial);
otherwise a local Ray starts without the dashboard. Ray Train's placement-group cleaner asks the
state API (served by the dashboard) every few seconds whether its controller is alive, and
without a dashboard it logs a warning each time; ``quiet_worker_logs`` runs in every worker
process and raises that one logger's level, so the training output stays readable.
"""

from __future__ import annotations

import logging
from typing import Any

NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """The ``worker_process_setup_hook`` of the Ray this module starts."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def start_ray(**init: Any) -> float:
    """Join or start Ray (``init``: extra ``ray.init`` arguments); the cluster's CPUs."""
    import ray

    if not ray.is_initialized():
        runtime_env = {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"}
        ray.init(
            include_dashboard=False,
            configure_logging=False,
            runtime_env=init.pop("runtime_env", None) or runtime_env,
            **init,
        )
    return float(ray.cluster_resources().get("CPU", 0))
