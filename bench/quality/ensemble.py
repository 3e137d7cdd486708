"""What an ensemble of fold models would score: the mean of their held-out probabilities.

Each ``scbert cv`` report names, per held-out fold, the MLflow run of its scBERT model; every run
keeps its test fold's calibrated probabilities (``test_predictions.npz``). For reports of the same
folds (the same ingest, any recipes), this averages the probabilities of the runs on each fold
and scores the argmax as ``scbert cv`` does (accuracy, macro F1, mean ± std over the folds), for
each report alone, every pair, and all of them; the first report's baselines are printed beside.
Run it where the reports' runs are tracked (their ``mlruns.db``):

    python bench/quality/ensemble.py /tmp/q/avg150.json /tmp/q/cyc150.json [...]

It trains nothing: an ensemble of models already trained, to judge whether training several
models per fold (a seed ensemble, N times the CV's cost) is worth its time.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from scbert_platform.train.loop import score_predictions
from scbert_platform.train.metrics import mean_std


def fold_predictions(report: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Held-out fold -> (true label ids, calibrated probabilities) of a report's scBERT runs."""
    from scbert_platform.train.distributed import read_test_predictions

    group = json.loads(report.read_text())["groups"][0]
    return {f["held_out"]: read_test_predictions(f["run_id"]) for f in group["folds"]}


def ensemble_scores(members: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, float]:
    """Accuracy and macro F1 (mean and std over the folds, as ``scbert cv``'s) of the members'
    mean probabilities."""
    folds = []
    for fold, (y_true, _) in members[0].items():
        proba = np.mean([m[fold][1] for m in members], axis=0)
        labels = [str(i) for i in range(proba.shape[1])]
        folds.append(score_predictions(y_true, proba, labels)[1])
    return mean_std(folds, ("accuracy", "macro_f1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="scbert cv --metrics reports")
    args = parser.parse_args()
    import mlflow

    from scbert_platform.console import quiet_libraries
    from scbert_platform.track.runs import tracking_uri

    quiet_libraries()  # MLflow's download bar for every run's predictions, among others
    mlflow.set_tracking_uri(tracking_uri())
    preds = {r.stem: fold_predictions(r) for r in args.reports}
    folds = [set(p) for p in preds.values()]
    if any(f != folds[0] for f in folds):
        raise SystemExit("the reports do not hold the same held-out folds: no ensemble of them")
    print("| models (mean probability) | accuracy | macro F1 |\n| --- | ---: | ---: |")
    names = list(preds)
    sizes = sorted({1, 2, len(names)})
    for size in sizes:
        for combo in itertools.combinations(names, size):
            s = ensemble_scores([preds[n] for n in combo])
            print(
                f"| {' + '.join(combo)} | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} "
                f"| {s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f} |"
            )
    for g in json.loads(args.reports[0].read_text())["groups"][1:]:
        print(
            f"| {g['model']} (baseline, same folds) | {g['accuracy_mean']:.3f} ± "
            f"{g['accuracy_std']:.3f} | {g['macro_f1_mean']:.3f} ± {g['macro_f1_std']:.3f} |"
        )


if __name__ == "__main__":
    main()
