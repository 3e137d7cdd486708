"""The MLflow model registry: ``register`` a run's model, ``promote`` it past a gate, ``rollback``.

Registered models are named ``scbert-<dataset>``. ``register`` adds a version and moves the alias
``challenger`` to it; ``promote`` moves ``champion`` to the challenger only when the gate passes:

1. the challenger has the gate metric (``tune.gate_metric``, 5-fold CV macro F1 by default) and
   it is not below the champion's by more than ``tune.gate_tolerance``;
2. both were evaluated on the same dataset manifest and gene panel;
3. the challenger answers a smoke prediction on its stored input example.

Otherwise it refuses and says why; ``force`` skips the gate with a reason that is recorded.
``rollback`` moves ``champion`` back to the version it replaced. Every alias move is recorded on
the version it lands on (tag ``scbert.alias_history``: who, when, why).
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass
from typing import Any

from scbert_platform.tracking import MODEL_URI_TAG, registry_client

CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_TAG = "scbert.alias_history"
PREVIOUS_TAG = "scbert.previous_champion"
SOURCE_TAGS = ("scbert.manifest_sha256", "scbert.panel_sha256", "scbert.source_sha256")


class GateRefused(RuntimeError):
    """The challenger did not pass the promotion gate; the message lists every reason."""


@dataclass
class AliasMove:
    name: str
    alias: str
    version: str
    previous: str | None
    reason: str


def register(run_id: str, *, name: str | None = None) -> AliasMove:
    """Register the run's pyfunc model as a new version and move ``challenger`` to it."""
    client = registry_client()
    run = client.get_run(run_id)
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise ValueError(
            f"run {run_id} has no {MODEL_URI_TAG} tag: register a fine-tuning run (scbert "
            "finetune logs the model), not a pretraining one"
        )
    name = name or f"scbert-{run.data.tags.get('scbert.dataset', 'model')}"
    tags = {key: run.data.tags[key] for key in SOURCE_TAGS if key in run.data.tags}
    commit = run.data.tags.get("mlflow.source.git.commit")
    if commit:
        tags["scbert.git_commit"] = commit
    tags |= {
        f"metric.{key}": str(value)
        for key, value in run.data.metrics.items()
        if key.startswith(("cv/", "test/accuracy", "test/macro_f1"))
    }
    tags["scbert.run_id"] = run_id
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags)
    return _move(client, name, CHALLENGER, str(version.version), f"registered from run {run_id}")


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:
        return None


def _move(client: Any, name: str, alias: str, version: str, reason: str) -> AliasMove:
    previous = _alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    target = client.get_model_version(name, version)
    history = json.loads(target.tags.get(HISTORY_TAG, "[]"))
    history.append(
        {
            "alias": alias,
            "who": getpass.getuser(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "why": reason,
            "replaced": None if previous is None else str(previous.version),
        }
    )
    client.set_model_version_tag(name, version, HISTORY_TAG, json.dumps(history))
    return AliasMove(
        name, alias, version, None if previous is None else str(previous.version), reason
    )


def gate(
    client: Any, name: str, challenger: Any, champion: Any | None, *, metric: str, tolerance: float
) -> list[str]:
    """The reasons the challenger may not replace the champion (empty: it may)."""
    problems = []
    key = f"metric.{metric}"
    if key not in challenger.tags:
        problems.append(
            f"version {challenger.version} has no {metric} (run scbert cv on it, or choose "
            f"another tune.gate_metric)"
        )
    elif champion is not None and key in champion.tags:
        new, old = float(challenger.tags[key]), float(champion.tags[key])
        if new < old - tolerance:
            problems.append(
                f"{metric} {new:.4f} is below the champion's (version {champion.version}) "
                f"{old:.4f} by more than the tolerance {tolerance:g}"
            )
    if champion is not None:
        for tag in ("scbert.manifest_sha256", "scbert.panel_sha256"):
            if challenger.tags.get(tag) != champion.tags.get(tag):
                what = "dataset manifest" if "manifest" in tag else "gene panel"
                problems.append(
                    f"evaluated on another {what} than the champion ({tag} "
                    f"{str(challenger.tags.get(tag))[:12]} vs {str(champion.tags.get(tag))[:12]})"
                )
    problems += smoke_test(name, str(challenger.version))
    return problems


def smoke_test(name: str, version: str) -> list[str]:
    """Load the version as a pyfunc and predict its stored input example."""
    import mlflow

    uri = f"models:/{name}/{version}"
    try:
        model = mlflow.pyfunc.load_model(uri)
        example = model.input_example
        if example is None:
            return [f"version {version} has no stored input example to smoke-test"]
        out = model.predict(example)
        if len(out) != len(example) or "cell_type" not in out:
            return [
                f"version {version} answered its example with {len(out)} rows, not "
                f"{len(example)} rows with a cell_type"
            ]
    except Exception as err:  # any failure to load or predict refuses the promotion
        return [f"version {version} failed its smoke prediction: {type(err).__name__}: {err}"]
    return []


def promote(
    name: str,
    *,
    metric: str = "cv/macro_f1",
    tolerance: float = 0.01,
    force_reason: str | None = None,
) -> AliasMove:
    """Move ``champion`` to the challenger if the gate passes (or ``force_reason`` is given)."""
    client = registry_client()
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise GateRefused(f"{name} has no {CHALLENGER}: scbert register a run first")
    champion = _alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        raise GateRefused(f"version {challenger.version} is already the {CHAMPION}")
    if force_reason is not None:
        if not force_reason.strip():
            raise ValueError("--force needs a reason")
        client.set_model_version_tag(name, challenger.version, "scbert.forced", force_reason)
        reason = f"forced: {force_reason}"
    else:
        problems = gate(client, name, challenger, champion, metric=metric, tolerance=tolerance)
        if problems:
            raise GateRefused(
                f"version {challenger.version} not promoted:\n- " + "\n- ".join(problems)
            )
        reason = f"passed the gate on {metric} (tolerance {tolerance:g})"
    if champion is not None:
        client.set_model_version_tag(name, challenger.version, PREVIOUS_TAG, champion.version)
    return _move(client, name, CHAMPION, str(challenger.version), reason)


def rollback(name: str) -> AliasMove:
    """Move ``champion`` back to the version the current champion replaced."""
    client = registry_client()
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        raise GateRefused(f"{name} has no {CHAMPION} to roll back")
    previous = champion.tags.get(PREVIOUS_TAG)
    if not previous:
        raise GateRefused(f"{CHAMPION} version {champion.version} replaced no earlier version")
    return _move(client, name, CHAMPION, previous, f"rollback from version {champion.version}")
