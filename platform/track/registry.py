"""The MLflow model registry: ``register`` a run's model, ``promote`` it past a gate, ``rollback``.

Registered models are named ``scbert-<dataset>``. ``register`` adds a version and moves the alias
``challenger`` to it; ``promote`` moves ``champion`` to the challenger only when the gate passes:

1. the challenger has the gate metric (``tune.gate_metric``, 5-fold CV macro F1 by default) and
   it is not below the champion's by more than ``tune.gate_tolerance``;
2. its CV macro F1 is not below the best baseline's on the same folds (``scbert cv --baseline``:
   ``cv/baseline_macro_f1``, no tolerance); a CV run without baselines has no such figure, and
   this rule then says nothing;
3. both were evaluated on the same dataset manifest and gene panel;
4. the challenger answers a smoke prediction on its stored input example.

Otherwise it refuses and says why; ``force`` skips the gate with a reason that is recorded.
``rollback`` moves ``champion`` back to the version it replaced. Every alias move is recorded on
the version it lands on (tag ``scbert.alias_history``: who, when, why).

A move killed half-way (SIGKILL, a lost machine) leaves a consistent registry, and the next
``register``, ``promote`` or ``rollback`` finishes or forgets it first (``_move``).
"""

from __future__ import annotations

import getpass
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from scbert_platform.data.preprocess import TAG_PREFIX as PREPROCESSING_TAGS
from scbert_platform.track.runs import MODEL_URI_TAG, registry_client

CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_TAG = "scbert.alias_history"
PREVIOUS_TAG = "scbert.previous_champion"
FORCED_TAG = "scbert.forced"
MOVE_TAG = "scbert.last_alias_move"  # on the registered model: the latest move, begun or done
INTERRUPTED_NOTE = " (finished now: the command that began it was stopped half-way)"
SOURCE_TAGS = ("scbert.manifest_sha256", "scbert.panel_sha256", "scbert.source_sha256")
BASELINE_METRIC = "cv/baseline_macro_f1"  # the best baseline's mean macro F1 on the CV's folds
BASELINE_TAG = "scbert.cv_best_baseline"  # its name, e.g. logreg


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
    """Register the run's pyfunc model as a new version and move ``challenger`` to it. A run is
    one version: registering it again (after a kill between the version and the alias, or to
    make it the challenger once more) moves ``challenger`` to the version it already has."""
    client = registry_client()
    run = client.get_run(run_id)
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise ValueError(
            f"run {run_id} has no {MODEL_URI_TAG} tag: register a fine-tuning run (scbert "
            "finetune logs the model), not a pretraining one"
        )
    name = name or f"scbert-{run.data.tags.get('scbert.dataset', 'model')}"
    tags = {key: run.data.tags[key] for key in (*SOURCE_TAGS, BASELINE_TAG) if key in run.data.tags}
    # the model's preprocessing record (scbert.preprocessing.*), as fit tagged the run
    tags |= {k: v for k, v in run.data.tags.items() if k.startswith(PREPROCESSING_TAGS)}
    commit = run.data.tags.get("mlflow.source.git.commit")
    if commit:
        tags["scbert.git_commit"] = commit
    tags |= {
        f"metric.{key}": str(value)
        for key, value in run.data.metrics.items()
        if key.startswith(("cv/", "test/accuracy", "test/macro_f1"))
    }
    tags["scbert.run_id"] = run_id
    if _registered_model(client, name) is None:
        client.create_registered_model(name)
    _finish_interrupted(client, name)
    earlier = _version_of_run(client, name, run_id)
    if earlier is not None:
        version, reason = str(earlier.version), f"registered from run {run_id} (again)"
        holder = _alias_version(client, name, CHALLENGER)
        if holder is not None and str(holder.version) == version:
            return AliasMove(
                name, CHALLENGER, version, version, f"{reason}: already the {CHALLENGER}"
            )
    else:
        created = client.create_model_version(name, model_uri, run_id=run_id, tags=tags)
        version, reason = str(created.version), f"registered from run {run_id}"
    return _move(client, name, CHALLENGER, version, reason, "register")


def _version_of_run(client: Any, name: str, run_id: str) -> Any | None:
    """The version ``register`` made of this run, if any (the lowest, should there be several)."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _registered_model(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:  # not registered (a locked database is TrackingLocked: raised)
        return None


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (a locked database, TrackingLocked, is raised)
        return None


def _move(
    client: Any,
    name: str,
    alias: str,
    version: str,
    reason: str,
    kind: str,
    *,
    forced: str | None = None,
) -> AliasMove:
    """Move ``alias`` to ``version`` so that a kill between any two writes leaves a consistent
    registry. The order matters:

    1. the move as intended (``MOVE_TAG`` on the registered model, with an id);
    2. on a promotion, the champion it replaces (``PREVIOUS_TAG`` on the target), so that a
       rollback works from the moment the alias lands;
    3. the alias: the commit point. Until here serving and rollback see the old champion, and
       what 1 and 2 wrote is harmless (2 is only read on the champion, and rewritten by the
       next promotion of that version);
    4. the records of the move (``_record``): forced reason and history entry on the target.

    A kill before 3 leaves the old state (the next move replaces the intent); a kill after 3
    leaves the new state with its records missing, which ``_finish_interrupted`` writes from
    the intent before any later move. Writing the history before the alias instead would
    record moves that never happened.
    """
    holder = _alias_version(client, name, alias)
    intent = {
        "id": uuid.uuid4().hex[:12],
        "kind": kind,
        "alias": alias,
        "version": version,
        "previous": None if holder is None else str(holder.version),
        "reason": reason,
        "forced": forced,
        "who": getpass.getuser(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    client.set_registered_model_tag(name, MOVE_TAG, json.dumps(intent))
    if kind == "promote" and intent["previous"] is not None:
        client.set_model_version_tag(name, version, PREVIOUS_TAG, intent["previous"])
    client.set_registered_model_alias(name, alias, version)
    _record(client, name, intent)
    return _as_move(name, intent)


def _record(client: Any, name: str, intent: dict[str, Any]) -> bool:
    """Write a committed move's forced reason and history entry, unless its history entry
    (found by the move's id) is already there. Returns whether it wrote them."""
    version = intent["version"]
    target = client.get_model_version(name, version)
    history = json.loads(target.tags.get(HISTORY_TAG, "[]"))
    if any(entry.get("id") == intent["id"] for entry in history):
        return False
    if intent.get("forced"):
        client.set_model_version_tag(name, version, FORCED_TAG, intent["forced"])
    history.append(
        {
            "alias": intent["alias"],
            "who": intent["who"],
            "when": intent["when"],
            "why": intent["reason"],
            "replaced": intent["previous"],
            "id": intent["id"],
        }
    )
    client.set_model_version_tag(name, version, HISTORY_TAG, json.dumps(history))
    return True


def _finish_interrupted(client: Any, name: str) -> dict[str, Any] | None:
    """The latest move, if it was killed after its commit point and is now finished here;
    None when it had completed, or never committed (its alias did not move: nothing to do)."""
    model = _registered_model(client, name)
    text = model.tags.get(MOVE_TAG) if model is not None else None
    if not text:
        return None
    intent: dict[str, Any] = json.loads(text)
    holder = _alias_version(client, name, intent["alias"])
    if holder is None or str(holder.version) != intent["version"]:
        return None
    return intent if _record(client, name, intent) else None


def _as_move(name: str, intent: dict[str, Any], *, note: str = "") -> AliasMove:
    return AliasMove(
        name, intent["alias"], intent["version"], intent["previous"], intent["reason"] + note
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
    baseline = _versus_baseline(challenger)
    if baseline is not None and baseline[0] < baseline[1]:
        mine, best, kind = baseline
        problems.append(
            f"cv/macro_f1 {mine:.4f} is below the best baseline's{kind} {best:.4f} on the same "
            "folds (train it further, or promote with --force REASON)"
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


def _versus_baseline(version: Any) -> tuple[float, float, str] | None:
    """(the version's ``cv/macro_f1``, the best baseline's on the same folds, `` (its name)``),
    or None when its CV run had no baselines (registered before they were logged, or run
    without ``--baseline``)."""
    mine = version.tags.get("metric.cv/macro_f1")
    best = version.tags.get(f"metric.{BASELINE_METRIC}")
    if mine is None or best is None:
        return None
    kind = version.tags.get(BASELINE_TAG)
    return float(mine), float(best), f" ({kind})" if kind else ""


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
    finished = _finish_interrupted(client, name)
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise GateRefused(f"{name} has no {CHALLENGER}: scbert register a run first")
    champion = _alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        if finished is not None and finished["kind"] == "promote":
            return _as_move(name, finished, note=INTERRUPTED_NOTE)
        raise GateRefused(f"version {challenger.version} is already the {CHAMPION}")
    if force_reason is not None:
        if not force_reason.strip():
            raise ValueError("--force needs a reason")
        reason = f"forced: {force_reason}"
    else:
        problems = gate(client, name, challenger, champion, metric=metric, tolerance=tolerance)
        if problems:
            raise GateRefused(
                f"version {challenger.version} not promoted:\n- " + "\n- ".join(problems)
            )
        reason = f"passed the gate on {metric} (tolerance {tolerance:g})"
        baseline = _versus_baseline(challenger)
        if baseline is not None:
            reason += f", not below the best baseline{baseline[2]} {baseline[1]:.4f}"
    version = str(challenger.version)
    return _move(client, name, CHAMPION, version, reason, "promote", forced=force_reason)


def rollback(name: str) -> AliasMove:
    """Move ``champion`` back to the version the current champion replaced. After a rollback
    that was killed past its commit point, this finishes that one instead of a second."""
    client = registry_client()
    finished = _finish_interrupted(client, name)
    if finished is not None and finished["kind"] == "rollback":
        return _as_move(name, finished, note=INTERRUPTED_NOTE)
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        raise GateRefused(f"{name} has no {CHAMPION} to roll back")
    previous = champion.tags.get(PREVIOUS_TAG)
    if not previous:
        raise GateRefused(f"{CHAMPION} version {champion.version} replaced no earlier version")
    reason = f"rollback from version {champion.version}"
    return _move(client, name, CHAMPION, previous, reason, "rollback")
