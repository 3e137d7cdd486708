"""MLflow tracking: where runs go, and what every run records about where it came from.

Default: ``sqlite:///mlruns.db`` with artifacts under ``mlartifacts/`` (both in the working
directory, created on first use, never on import). ``MLFLOW_TRACKING_URI`` points a team at a
tracking server instead.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlruns.db"
MODEL_URI_TAG = "scbert.model_uri"  # on a fine-tuning run: its pyfunc model, for the registry
DEFAULT_ARTIFACTS = "mlartifacts"


class TrackingLocked(RuntimeError):
    """The tracking database stayed locked by another process for longer than SQLite waits."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded SQLite file (absolute: Ray workers share it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _embedded_uri()


def _embedded_uri() -> str:
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def registry_client() -> Any:
    """An MLflow client on this tracking URI, which also holds the model registry; a database
    locked by another process is a ``TrackingLocked`` from any of its calls."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    with waiting_for_database():  # the client opens the store, which reads the database
        client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    return _LockReporting(client)


@contextmanager
def waiting_for_database() -> Iterator[None]:
    """Turn SQLite's "database is locked" into ``TrackingLocked`` naming the database.

    The wait itself is SQLite's: a connection retries a locked database for 5 s (MLflow's
    queries set 20 s), and succeeds as soon as the other process lets go. What is left after
    that is a process holding a transaction open (a sqlite3 shell, a stuck writer), which
    waiting longer would not fix.
    """
    started = time.monotonic()
    try:
        yield
    except Exception as err:
        if not _database_locked(err):
            raise
        waited = time.monotonic() - started
        raise TrackingLocked(
            f"the MLflow database {_database()} is locked by another process (waited "
            f"{waited:.0f} s): let it finish (another scbert command, mlflow ui, a sqlite3 "
            "shell with an open transaction) and run this again"
        ) from None


def _database() -> str:
    uri = tracking_uri()
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri


def _database_locked(err: BaseException | None) -> bool:
    """Whether ``err`` or an error behind it is SQLite's busy error (SQLAlchemy and MLflow wrap
    it, keeping its message)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "database is locked" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class _LockReporting:
    """An ``MlflowClient`` whose every call reports a locked database as ``TrackingLocked``
    (instead of SQLAlchemy's traceback)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with waiting_for_database():
                return attribute(*args, **kwargs)

        return call


def experiment_id(name: str) -> str:
    """The experiment's id, created if missing (local artifacts beside the default database).
    Every tracked run starts here: a locked database is a ``TrackingLocked``."""
    with waiting_for_database():
        return _experiment_id(name)


def _experiment_id(name: str) -> str:
    import mlflow

    # by the URI, not by whether MLFLOW_TRACKING_URI is set: mlflow.set_tracking_uri sets it in
    # this process, and a second experiment created here (a notebook's pretrain, then finetune)
    # would otherwise get MLflow's default artifact root, ./mlruns
    embedded = tracking_uri() == _embedded_uri()
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = (Path(DEFAULT_ARTIFACTS).resolve() / name).as_uri() if embedded else None
    return str(mlflow.create_experiment(name, artifact_location=location))


def git_commit(path: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def system_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def source_tags(manifest_path: Path) -> dict[str, str]:
    """Tags tying a run to its code and data: git commit, the dataset manifest's sha256 (the
    file DVC versions with the shards), the source file's and the panel's sha256."""
    import hashlib
    import json

    manifest = json.loads(manifest_path.read_text())
    tags = {
        "scbert.dataset": str(manifest.get("dataset")),
        "scbert.manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
        "scbert.source_sha256": str(manifest["source"]["sha256"]),
        "scbert.panel_sha256": str(manifest["panel"]["sha256"]),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
