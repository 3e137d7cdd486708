"""The ECE a perfectly calibrated model would show on so few cells (binning noise).

A model whose top-class probability is exactly the chance that it is right still shows an ECE
above zero on a finite set of cells: each bin's accuracy is a binomial draw around its
confidence. This draws such a model's cells, with the confidence distribution of a `scbert cv`
report (its pooled reliability bins), at each set size, and prints the mean ECE (15 bins, as
`train.metrics.expected_calibration_error`) with its 10th and 90th percentiles.

    python ece_floor.py reports/cv.json --cells 139 693
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scbert_platform.train.metrics import expected_calibration_error


def confidences(report: Path, model: str | None) -> tuple[np.ndarray, int]:
    """The calibrated top-class probabilities of a CV report's held-out cells (bin means), and
    the number of classes."""
    groups = [g for g in json.loads(report.read_text())["groups"] if "reliability" in g]
    group = next((g for g in groups if model in (None, g["model"])), None)
    if group is None:
        raise SystemExit(f"{report}: no calibrated model{f' {model!r}' if model else ''} in it")
    bins = group["reliability"]["calibrated"]
    conf = np.concatenate([np.full(b["n"], b["confidence"]) for b in bins])
    return conf, len(group["labels"])


def floor(conf: np.ndarray, n_classes: int, n_cells: int, draws: int, seed: int) -> np.ndarray:
    """ECE of ``draws`` sets of ``n_cells`` cells from a perfectly calibrated model (the top
    class at the drawn confidence, the rest shared by the other classes)."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for i in range(draws):
        c = rng.choice(conf, n_cells)
        right = rng.random(n_cells) < c
        rest = np.repeat(((1 - c) / (n_classes - 1))[:, None], n_classes - 1, axis=1)
        proba = np.column_stack([c, rest])
        out[i] = expected_calibration_error(proba, np.where(right, 0, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a `scbert cv --metrics` JSON")
    ap.add_argument("--model", help="the model's row (default: the first calibrated one)")
    ap.add_argument("--cells", type=int, nargs="+", default=[139, 693])
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    conf, n_classes = confidences(args.report, args.model)
    print("| cells | ECE of a perfectly calibrated model (mean) | 10th-90th percentile |")
    print("| ---: | ---: | ---: |")
    for n in args.cells:
        ece = floor(conf, n_classes, n, args.draws, args.seed)
        low, high = np.percentile(ece, [10, 90])
        print(f"| {n} | {ece.mean():.3f} | {low:.3f}-{high:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
