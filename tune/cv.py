"""``scbert cv``: scBERT's cross-validation, one Ray Tune trial (a Ray Train run) per held-out
part, in parallel as resources allow, under one MLflow parent run.

Protocols (``--protocol``), after the paper:

- ``folds`` (default): each of the ingest's stratified folds in turn is the test set; the model
  trains on the other folds, with an inner validation split (``train.val_fraction`` of them, by a
  seeded hash of the cell id) for early stopping and the choice of checkpoint.
- ``reference-size`` (paper Fig. 2d): the same, training on only a fraction of the reference
  (``--fractions``, 10-90%), one group of folds per fraction.
- ``leave-one-dataset-out`` (inter-dataset, paper Fig. 3): each dataset of the shards' ``batch``
  column (``scbert ingest --batch-key``) in turn is the test set.
- ``novel-type`` (paper Fig. 4): the ``--novel-type`` cell types are never trained on; in each test
  fold a cell is Unassigned when its top probability over the known types is below
  ``--threshold``. Reported: known-type accuracy (correct and assigned, over the known-type
  cells) and the paper's strict novel-type accuracy: of the cells that are truly novel or
  predicted Unassigned, the fraction that are both.

Each fold's model is evaluated on its test cells (never on the cells that chose its checkpoint);
the report gives mean ± std over the folds of accuracy and macro F1, per-class F1, and the
confusion matrix summed over the folds (every labelled cell tested once).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scbert.config import UNASSIGNED_THRESHOLD
from scbert_platform.cluster import start_ray
from scbert_platform.data.splits import CellSplit
from scbert_platform.params import Params, TrainParams
from scbert_platform.train.distributed import TrainingError, metric_name
from scbert_tune.trials import (
    Study,
    child_runs,
    close_stopped_children,
    concurrency,
    kept_validation_score,
    parent_run,
    running,
    tuner,
    with_trial_resources,
)

PROTOCOLS = ("folds", "reference-size", "leave-one-dataset-out", "novel-type")
DEFAULT_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
PRETRAINED, SCRATCH = "scBERT", "scBERT (from scratch)"


def plan(
    shards: str | Path,
    params: Params,
    *,
    protocol: str = "folds",
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    novel_types: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The trials of a protocol: ``{"group", "held_out", "split"}`` each."""
    from scbert_platform.data.loader import check_shards
    from scbert_platform.data.manifest import read_manifest

    manifest = read_manifest(shards)
    check_shards(shards, manifest)  # a damaged shard fails here, not inside every trial
    labels = list(manifest["labels"]["counts"])
    n_folds, train = int(manifest["folds"]["n_folds"]), params.train
    if protocol == "folds":
        return _fold_trials(n_folds, train, "all")
    if protocol == "reference-size":
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"--fractions must be in (0, 1], got {list(fractions)}")
        return [
            t
            for f in fractions
            for t in _fold_trials(n_folds, train, f"reference {f:.0%}", train_fraction=float(f))
        ]
    if protocol == "leave-one-dataset-out":
        return _dataset_trials(shards, manifest, train)
    if protocol == "novel-type":
        groups = _novel_groups(novel_types, labels)
        return [
            t
            for g in groups
            for t in _fold_trials(n_folds, train, f"novel: {', '.join(g)}", exclude_labels=g)
        ]
    raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")


def _fold_trials(
    n_folds: int, train: TrainParams, group: str, **rules: Any
) -> list[dict[str, Any]]:
    """One trial per fold, each fold in turn the test set, with the train section's inner
    validation split; ``rules``: more ``CellSplit`` fields (which training cells are kept)."""
    return [
        {
            "group": group,
            "held_out": f"fold {k}",
            "split": CellSplit(
                test_folds=(k,), val_fraction=train.val_fraction, seed=train.seed, **rules
            ).to_dict(),
        }
        for k in range(n_folds)
    ]


def _dataset_trials(
    shards: str | Path, manifest: dict[str, Any], train: TrainParams
) -> list[dict[str, Any]]:
    """leave-one-dataset-out: one trial per dataset of the shards' ``batch`` column."""
    batches = manifest.get("batches")
    if not batches:
        raise ValueError(
            f"{shards} records no datasets: ingest the concatenated datasets with "
            "--batch-key (e.g. the column anndata.concat(..., label=...) wrote)"
        )
    names = sorted(batches["counts"])
    if len(names) < 2:
        raise ValueError(f"leave-one-dataset-out needs 2 or more datasets, found {names}")
    return [
        {
            "group": "all",
            "held_out": name,
            "split": CellSplit(
                test_batches=(name,), val_fraction=train.val_fraction, seed=train.seed
            ).to_dict(),
        }
        for name in names
    ]


def _novel_groups(novel_types: tuple[str, ...], labels: list[str]) -> list[tuple[str, ...]]:
    """novel-type: the groups of types held out of training together (``each``: every type on
    its own), checked against the shards' cell types."""
    if not novel_types:
        raise ValueError("--protocol novel-type needs --novel-type LABEL (or 'each')")
    groups = [(t,) for t in labels] if novel_types == ("each",) else [novel_types]
    unknown = sorted({t for g in groups for t in g} - set(labels))
    if unknown:
        raise ValueError(f"--novel-type {unknown} not among the cell types {labels}")
    if any(len(set(labels) - set(g)) < 2 for g in groups):
        raise ValueError("novel-type evaluation needs 2 or more known cell types left")
    return groups


@dataclass
class CvResult:
    name: str
    parent_run_id: str
    protocol: str
    groups: list[dict[str, Any]]  # one per (model, group): means, stds, per-fold, per-class
    markdown: str
    directory: Path


def cross_validate(
    shards: str | Path,
    params: Params,
    *,
    protocol: str = "folds",
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    novel_types: tuple[str, ...] = (),
    threshold: float = UNASSIGNED_THRESHOLD,
    init_from: str | None = None,
    from_scratch: bool = False,
    compare_from_scratch: bool = False,
    baselines: tuple[str, ...] = (),
    name: str | None = None,
    resume: bool = False,
    max_concurrent: int | None = None,
    trial_cpus: float | None = None,
    trial_gpus: float | None = None,
) -> CvResult:
    """Run (or, ``resume``, continue) a cross-validation; everything is logged to the parent run
    and ``markdown`` holds the tables."""
    shards = Path(shards)
    params = with_trial_resources(params, trial_cpus, trial_gpus)
    _check_options(init_from, from_scratch, compare_from_scratch, threshold)
    trials = plan(shards, params, protocol=protocol, fractions=fractions, novel_types=novel_types)
    variants = [SCRATCH if from_scratch else PRETRAINED] + (
        [SCRATCH] if compare_from_scratch else []
    )
    items = _trial_items(trials, variants)
    name = name or f"cv-{time.strftime('%Y%m%d-%H%M%S')}"
    study = Study("cv", name, shards, params, init_from=init_from, from_scratch=from_scratch)
    parallel = concurrency(params, start_ray(), max_concurrent)
    parent = parent_run(
        study,
        resume,
        {
            "protocol": protocol,
            "trials": len(items),
            "variants": ", ".join(variants),
            "init_from": init_from or "",
            "threshold": threshold,
            "novel_types": ", ".join(novel_types),
            "fractions": ", ".join(f"{f:g}" for f in fractions)
            if protocol == "reference-size"
            else "",
            "max_concurrent": parallel,
        },
    )
    print(
        f"cv {name}: {protocol}, {len(items)} trial(s) ({', '.join(variants)}), {parallel} at "
        f"once; MLflow parent run {parent}" + (" (resumed)" if resume else ""),
        file=sys.stderr,
    )
    from ray import tune

    with running(parent):
        space = {"trial": tune.grid_search(items)}
        grid = _fit_trials(study, parent, space, len(items), resume=resume, parallel=parallel)
        groups, text = _report(study, parent, grid, protocol, threshold, baselines)
    return CvResult(name, parent, protocol, groups, text, study.directory)


def _check_options(
    init_from: str | None, from_scratch: bool, compare_from_scratch: bool, threshold: float
) -> None:
    """The options ``cross_validate`` cannot run with (a ``ValueError`` each)."""
    if from_scratch and init_from:
        raise ValueError("give --init-from (pretrained) or --from-scratch, not both")
    if compare_from_scratch and not init_from:
        raise ValueError("--compare-from-scratch compares against --init-from: give both")
    if not 0 < threshold < 1:
        raise ValueError(f"--threshold must be between 0 and 1, got {threshold}")


def _trial_items(trials: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Every planned trial once per variant, with the variant and the tags of its run."""
    items = [t | {"variant": v, "from_scratch": v == SCRATCH} for v in variants for t in trials]
    for item in items:
        item["tags"] = {"cv_group": item["group"], "cv_held_out": item["held_out"]}
        item["tags"]["cv_variant"] = item["variant"]
    return items


def _fit_trials(
    study: Study,
    parent: str,
    param_space: dict[str, Any],
    n_items: int,
    *,
    resume: bool,
    parallel: int,
) -> Any:
    """The trials run (``resume``: those not finished before) and their results; a trial that
    failed fails the cross-validation, after its child run is closed as FAILED."""
    grid = tuner(
        study,
        parent,
        param_space=param_space,
        resume=resume,
        max_concurrent=parallel,
        n_trials=n_items,
    ).fit()
    failed = {}
    for result in grid:
        if result.error is not None:
            failed[Path(result.path).name] = f"error: {type(result.error).__name__}"
    close_stopped_children(parent, failed)
    if failed:
        raise TrainingError(
            f"{len(failed)} of {n_items} trials failed ({sorted(failed)}); fix the cause "
            f"and continue with --resume {study.name} (finished trials are kept)"
        )
    return grid


def _report(
    study: Study,
    parent: str,
    grid: Any,
    protocol: str,
    threshold: float,
    baselines: tuple[str, ...],
) -> tuple[list[dict[str, Any]], str]:
    """Each fold model scored on its test cells, aggregated per (model, group), the baselines
    beside, and the tables: logged to the parent run and written to the study's directory."""
    runs = child_runs(parent)
    evaluated = [_evaluate_trial(result, runs, threshold) for result in grid]
    groups = _aggregate(evaluated, protocol)
    groups += _baselines(study.shards, baselines, protocol, study.params.data.seed, threshold)
    text = report_markdown(groups, protocol, threshold)
    _log_parent(study, parent, groups, protocol, text)
    return groups, text


def _evaluate_trial(result: Any, runs: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The fold model's predictions on its test cells, as its run evaluated and logged them."""
    from scbert import load_pretrained
    from scbert_platform.train.distributed import (
        CHECKPOINT_TAG,
        read_calibration,
        read_test_predictions,
    )

    item = result.config["trial"]
    trial_id = Path(result.path).name
    run = runs.get(trial_id)
    if run is None or CHECKPOINT_TAG not in run.data.tags:
        raise TrainingError(f"trial {trial_id} has no MLflow run with a model checkpoint")
    bundle = load_pretrained(run.data.tags[CHECKPOINT_TAG])
    assert bundle.classes is not None
    split = CellSplit.from_dict(item["split"])
    y_true, proba = read_test_predictions(run.info.run_id)
    return {
        "variant": item["variant"],
        "group": item["group"],
        "held_out": item["held_out"],
        "trial_id": trial_id,
        "run_id": run.info.run_id,
        "model_uri": run.data.tags.get("scbert.model_uri"),
        "val_macro_f1": kept_validation_score(run.data.metrics),
        "labels": bundle.classes,
        "excluded": list(split.exclude_labels),
        "y_true": y_true,
        "proba": proba,
        "temperature": (read_calibration(run.data.tags[CHECKPOINT_TAG]) or {}).get("temperature"),
        "threshold": threshold,
    }


def uncalibrated(proba: np.ndarray, temperature: float | None) -> np.ndarray:
    """The probabilities before temperature scaling: the calibrated model's logits are the
    original ones over T, so softmax(T * log p) gives the originals back."""
    if not temperature:
        return proba
    z = temperature * np.log(np.clip(proba, 1e-30, None))
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration_scores(
    y_true: np.ndarray, proba: np.ndarray, before: np.ndarray, threshold: float
) -> dict[str, float]:
    """ECE after and before calibration (``before``: ``uncalibrated(proba, T)``), and the
    selective scores at ``threshold`` (``train.metrics.selective_scores``) of both."""
    from scbert_platform.train.metrics import expected_calibration_error, selective_scores

    scores = {
        "ece": expected_calibration_error(proba, y_true),
        "ece_uncalibrated": expected_calibration_error(before, y_true),
    }
    scores |= selective_scores(proba, y_true, threshold)
    scores |= {
        f"{k}_uncalibrated": v for k, v in selective_scores(before, y_true, threshold).items()
    }
    return scores


def novel_type_scores(
    y_true: np.ndarray, proba: np.ndarray, labels: list[str], novel: list[str], threshold: float
) -> dict[str, float]:
    """Known-type accuracy and the strict novel-type accuracy (see the module docstring).

    The novel types' probabilities are dropped and the rest renormalised, so a prediction is
    always a known type or Unassigned."""
    novel_ids = [labels.index(t) for t in novel]
    known = np.ones(len(labels), dtype=bool)
    known[novel_ids] = False
    p = proba[:, known]
    p = p / p.sum(axis=1, keepdims=True).clip(min=1e-12)
    predicted = np.flatnonzero(known)[p.argmax(axis=1)]
    unassigned = p.max(axis=1) < threshold
    is_novel = np.isin(y_true, novel_ids)
    is_known = ~is_novel & (y_true >= 0)
    correct = (predicted == y_true) & ~unassigned
    union = is_novel | unassigned
    return {
        "known_accuracy": float(correct[is_known].mean()) if is_known.any() else float("nan"),
        "novel_accuracy": float((is_novel & unassigned).sum() / union.sum())
        if union.any()
        else float("nan"),
        "novel_recall": float(unassigned[is_novel].mean()) if is_novel.any() else float("nan"),
        "known_unassigned": float(unassigned[is_known].mean()) if is_known.any() else float("nan"),
        "n_novel": int(is_novel.sum()),
    }


CALIBRATION_KEYS = (
    "ece",
    "ece_uncalibrated",
    "kept",
    "accuracy_kept",
    "unassigned_correct",
    "unassigned_wrong",
    "kept_uncalibrated",
    "accuracy_kept_uncalibrated",
    "unassigned_correct_uncalibrated",
    "unassigned_wrong_uncalibrated",
)


def _aggregate(evaluated: list[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
    """The fold models' scores per (model, group), in the order they first appear."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in evaluated:
        groups.setdefault((e["variant"], e["group"]), []).append(e)
    return [
        _group_summary(variant, group, members, protocol)
        for (variant, group), members in groups.items()
    ]


def _group_summary(
    variant: str, group: str, members: list[dict[str, Any]], protocol: str
) -> dict[str, Any]:
    """One (model, group): its folds' scores, their means and stds, per-class F1, the confusion
    matrix summed over the folds, the pooled reliability bins of calibrated models, and the fold
    model with the best validation macro F1 (``chosen``)."""
    from scbert_platform.train.metrics import (
        expected_calibration_error,
        mean_per_class_f1,
        mean_std,
        reliability_bins,
    )

    members.sort(key=lambda e: str(e["held_out"]))
    labels = members[0]["labels"]
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    folds, reports = [], []
    pooled_cal: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for e in members:
        fold, report, calibrated = _fold_scores(e, labels)
        confusion += np.asarray(report["confusion_matrix"])
        if calibrated is not None:
            pooled_cal.append(calibrated)
        reports.append(report)
        folds.append(fold)
    summary: dict[str, Any] = {
        "model": variant,
        "group": group,
        "folds": folds,
        "labels": labels,
        "confusion_matrix": confusion.tolist(),
        "per_class_f1": mean_per_class_f1(reports),
    }
    keys = ["accuracy", "macro_f1"]
    if pooled_cal:
        keys += [k for k in CALIBRATION_KEYS if all(k in f for f in folds)]
        y_all = np.concatenate([c[0] for c in pooled_cal])
        after, before = (np.concatenate([c[i] for c in pooled_cal]) for i in (1, 2))
        summary["reliability"] = {
            "uncalibrated": reliability_bins(before, y_all),
            "calibrated": reliability_bins(after, y_all),
        }
        # every held-out cell at once (each from its fold's model): a fold's ~100 cells put a
        # floor of several hundredths under the ECE of even a perfectly calibrated model
        summary["ece_pooled"] = expected_calibration_error(after, y_all)
        summary["ece_pooled_uncalibrated"] = expected_calibration_error(before, y_all)
    if protocol == "novel-type":
        keys += ["known_accuracy", "novel_accuracy", "novel_recall", "known_unassigned"]
        keys += [
            f"{k}_uncalibrated" for k in keys[-4:] if all(f"{k}_uncalibrated" in f for f in folds)
        ]
    summary |= mean_std(folds, keys)
    best = max(folds, key=lambda f: f["val_macro_f1"] or -1.0)
    summary["chosen"] = next(e for e in members if e["run_id"] == best["run_id"])["model_uri"]
    summary["chosen_run_id"] = best["run_id"]
    return summary


def _fold_scores(
    e: dict[str, Any], labels: list[str]
) -> tuple[dict[str, Any], dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """One fold model on its labelled test cells: the fold's scores, its classification report,
    and (a calibrated model) the true labels with the probabilities after and before
    calibration."""
    from scbert_platform.train.metrics import classification_report

    labelled = e["y_true"] >= 0
    y_true, proba = e["y_true"][labelled], e["proba"][labelled]
    pred = proba.argmax(axis=1)
    if e["excluded"]:  # a novel type is never predicted: drop it, as in the scores
        allowed = np.array([label not in e["excluded"] for label in labels])
        pred = np.flatnonzero(allowed)[proba[:, allowed].argmax(axis=1)]
    report = classification_report(y_true, pred, labels)
    fold = {
        "held_out": e["held_out"],
        "n": report["n"],
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "val_macro_f1": e["val_macro_f1"],
        "run_id": e["run_id"],
    }
    before = uncalibrated(proba, e["temperature"])
    calibrated = None
    if e["temperature"] is not None:  # a calibrated model: before and after
        fold |= calibration_scores(y_true, proba, before, e["threshold"])
        calibrated = (y_true, proba, before)
    if e["excluded"]:
        fold |= novel_type_scores(y_true, proba, labels, e["excluded"], e["threshold"])
        scores = novel_type_scores(y_true, before, labels, e["excluded"], e["threshold"])
        fold |= {f"{k}_uncalibrated": v for k, v in scores.items() if k != "n_novel"}
    return fold, report, calibrated


def _baselines(
    shards: Path, kinds: tuple[str, ...], protocol: str, seed: int, threshold: float
) -> list[dict[str, Any]]:
    from scbert_tune.baselines import cross_validate as baseline_cv

    if kinds and protocol != "folds":
        print(f"note: baselines run on the folds protocol only, not {protocol}", file=sys.stderr)
        return []
    out = []
    for kind in kinds:
        result = baseline_cv(shards, kind, seed=seed, threshold=threshold)
        result["group"] = "all"
        out.append(result)
    return out


def report_markdown(groups: list[dict[str, Any]], protocol: str, threshold: float) -> str:
    """The CV table (mean ± std over the folds), and per-class F1 of the scBERT models beside the
    baselines'."""
    novel = protocol == "novel-type"
    head = ["model", "" if protocol == "folds" else "group", "folds", "accuracy", "macro F1"]
    if novel:
        head += ["known-type accuracy", f"novel accuracy (strict, threshold {threshold:g})"]
    if protocol == "folds":
        head.pop(1)
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for g in groups:
        cells = [g["model"]] + ([] if protocol == "folds" else [g["group"]])
        cells += [str(len(g["folds"])), _pm(g, "accuracy"), _pm(g, "macro_f1")]
        if novel:
            cells += [_pm(g, "known_accuracy"), _pm(g, "novel_accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _calibration_markdown(groups, protocol, threshold)
    scored = [g for g in groups if g["per_class_f1"]]  # scBERT's groups and the baselines
    if scored:
        lines += ["", "Per-class F1 (mean over the folds where the type is tested):", ""]
        names = [
            f"{g['model']}" + ("" if protocol == "folds" else f" {g['group']}") for g in scored
        ]
        lines.append("| cell type | " + " | ".join(names) + " |")
        lines.append("| --- |" + " ---: |" * len(names))
        for label in scored[0]["labels"]:
            row = [
                f"{g['per_class_f1'][label]:.3f}" if label in g["per_class_f1"] else "-"
                for g in scored
            ]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _calibration_markdown(
    groups: list[dict[str, Any]], protocol: str, threshold: float
) -> list[str]:
    """Before and after temperature scaling (fitted on each fold's validation cells), on the
    held-out cells: ECE, and at the threshold the share of cells kept, their accuracy, and the
    share of correctly / wrongly called cells left Unassigned."""
    calibrated = [g for g in groups if "ece_mean" in g]
    if not calibrated:
        return []
    lines = [
        "",
        f"Calibration on the held-out cells (uncalibrated → calibrated; threshold {threshold:g}):",
        "",
        "| model | ECE (per fold) | ECE (all held-out cells) | kept | accuracy of kept "
        "| correct cells Unassigned | wrong cells Unassigned |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g in calibrated:
        name = g["model"] + ("" if protocol == "folds" else f" {g['group']}")
        cells = [  # a baseline has one set of probabilities (scikit-learn's own)
            f"{_pm(g, key + '_uncalibrated', 2)} → {_pm(g, key, 2)}"
            if f"{key}_uncalibrated_mean" in g
            else _pm(g, key, 2)
            for key in ("ece", "kept", "accuracy_kept", "unassigned_correct", "unassigned_wrong")
        ]
        pooled = [f"{g[k]:.3f}" for k in ("ece_pooled_uncalibrated", "ece_pooled") if k in g]
        cells.insert(1, " → ".join(pooled) or "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if protocol == "novel-type":
        lines += [
            "",
            "Novel-type scores of the uncalibrated models (the table above: calibrated):",
            "",
        ]
        lines += [
            "| model | group | known-type accuracy | novel accuracy (strict) |",
            "| --- | --- | ---: | ---: |",
        ]
        for g in calibrated:
            lines.append(
                f"| {g['model']} | {g['group']} | {_pm(g, 'known_accuracy_uncalibrated')} | "
                f"{_pm(g, 'novel_accuracy_uncalibrated')} |"
            )
    return lines


def _pm(group: dict[str, Any], key: str, digits: int = 3) -> str:
    mean, std = group.get(f"{key}_mean"), group.get(f"{key}_std")
    if mean is None or np.isnan(mean):
        return "-"
    if digits != 3:
        return f"{mean:.{digits}f}"
    return f"{mean:.3f} ± {std:.3f}"


def _metric_key(text: str) -> str:
    return metric_name(text).replace(" ", "_")


def _log_parent(
    study: Study,
    parent: str,
    groups: list[dict[str, Any]],
    protocol: str,
    text: str,
) -> None:
    """The groups' scores and the gate's tags on the parent run, then the report files (also
    written to the study's directory)."""
    from mlflow.tracking import MlflowClient

    from scbert_platform.track.runs import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    _log_scores(client, parent, groups, protocol)
    with tempfile.TemporaryDirectory() as tmp:
        _write_reports(Path(tmp), groups, text)
        for file in Path(tmp).iterdir():
            client.log_artifact(parent, str(file))
            (study.directory / file.name).write_bytes(file.read_bytes())


def _log_scores(client: Any, parent: str, groups: list[dict[str, Any]], protocol: str) -> None:
    """Each group's means and stds (the first group's unprefixed: what the registry gate reads),
    the first group's per-class F1, and with the folds protocol the chosen model and the best
    baseline's macro F1 (the gate's floor)."""
    from scbert_platform.track.registry import BASELINE_METRIC, BASELINE_TAG
    from scbert_platform.track.runs import MODEL_URI_TAG
    from scbert_tune.baselines import BASELINES

    main = groups[0]  # the first variant's first group: what the registry gate reads
    for g in groups:
        prefix = "cv" if g is main else f"cv/{_metric_key(g['model'])}"
        if g["group"] != "all":
            prefix += f"/{_metric_key(g['group'])}"
        keys = ("accuracy", "macro_f1", "known_accuracy", "novel_accuracy", "novel_recall")
        keys += CALIBRATION_KEYS + tuple(f"{k}_uncalibrated" for k in keys[2:])
        for key in keys:
            if f"{key}_mean" in g and not np.isnan(g[f"{key}_mean"]):
                client.log_metric(parent, f"{prefix}/{key}", g[f"{key}_mean"])
                client.log_metric(parent, f"{prefix}/{key}_std", g[f"{key}_std"])
        for key in ("ece_pooled", "ece_pooled_uncalibrated"):
            if key in g:
                client.log_metric(parent, f"{prefix}/{key}", g[key])
        if g is main:
            for label, f1 in g["per_class_f1"].items():
                client.log_metric(parent, f"cv/f1/{_metric_key(label)}", f1)
    if protocol == "folds" and main.get("chosen"):
        client.set_tag(parent, MODEL_URI_TAG, main["chosen"])
        client.set_tag(parent, "scbert.cv_model_run_id", main["chosen_run_id"])
    baselines = [g for g in groups if g["model"] in BASELINES and not np.isnan(g["macro_f1_mean"])]
    if protocol == "folds" and baselines:  # the floor of the registry gate, which reads this run
        best = max(baselines, key=lambda g: g["macro_f1_mean"])
        client.log_metric(parent, BASELINE_METRIC, best["macro_f1_mean"])
        client.set_tag(parent, BASELINE_TAG, best["model"])


def _write_reports(folder: Path, groups: list[dict[str, Any]], text: str) -> None:
    """``cv_report.md``, ``cv_results.json``, a confusion matrix per scBERT group and a
    reliability diagram per calibrated group, in ``folder``."""
    from scbert_platform.train.metrics import confusion_matrix_png, reliability_png
    from scbert_tune.baselines import BASELINES

    files = {"cv_report.md": text + "\n"}
    results = [{k: v for k, v in g.items() if k != "chosen"} for g in groups]
    files["cv_results.json"] = json.dumps(results, indent=2, default=float) + "\n"
    for name, content in files.items():
        (folder / name).write_text(content)
    for i, g in enumerate(x for x in groups if x["model"] not in BASELINES):
        png = folder / ("confusion_matrix.png" if i == 0 else f"confusion_matrix_{i}.png")
        confusion_matrix_png(
            g["confusion_matrix"],
            g["labels"],
            png,
            title=f"{g['model']} {'' if g['group'] == 'all' else g['group']}: "
            f"summed over {len(g['folds'])} held-out sets",
        )
    for i, g in enumerate(x for x in groups if x.get("reliability")):
        reliability_png(
            g["reliability"],
            folder / ("reliability.png" if i == 0 else f"reliability_{i}.png"),
            title=f"{g['model']}: held-out cells of {len(g['folds'])} folds",
        )
