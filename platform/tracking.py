"""MLflow tracking: where runs go, and what every run records about where it came from.

Default: ``sqlite:///mlruns.db`` with artifacts under ``mlartifacts/`` (both in the working
directory, created on first use, never on import). ``MLFLOW_TRACKING_URI`` points a team at a
tracking server instead.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlruns.db"
MODEL_URI_TAG = "scbert.model_uri"  # on a fine-tuning run: its pyfunc model, for the registry
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded SQLite file (absolute: Ray workers share it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def registry_client() -> Any:
    """An MLflow client on this tracking URI, which also holds the model registry."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def experiment_id(name: str) -> str:
    """The experiment's id, created if missing (local artifacts beside the default database)."""
    import mlflow

    embedded = "MLFLOW_TRACKING_URI" not in os.environ  # read first: mlflow sets it below
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
