"""The recipe study's table: one row per model of every ``scbert cv`` report in a directory
(``TASK-RECIPE.json``), mean ± std over the folds of accuracy, macro F1 and, for calibrated
scBERT models, the expected calibration error before → after temperature scaling.

    python bench/quality/table.py bench/quality/reports --out bench/quality/reports/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pm(group: dict[str, Any], key: str) -> str:
    if f"{key}_mean" not in group:
        return "-"
    return f"{group[f'{key}_mean']:.3f} ± {group[f'{key}_std']:.3f}"


def rows(directory: Path) -> list[str]:
    out = []
    for path in sorted(directory.glob("*.json")):
        task, _, recipe = path.stem.partition("-")
        report = json.loads(path.read_text())
        for group in report.get("groups", []):
            is_scbert = group["model"].startswith("scBERT")
            if not is_scbert and any(
                r.startswith(f"| {task} | (same folds) | {group['model']} ") for r in out
            ):
                continue  # the baselines once per task: every report has them on the same folds
            ece = "-"
            if "ece_uncalibrated_mean" in group:
                ece = f"{group['ece_uncalibrated_mean']:.3f} → {group['ece_mean']:.3f}"
            elif "ece_mean" in group:  # a baseline: scikit-learn's probabilities as they are
                ece = f"{group['ece_mean']:.3f}"
            out.append(
                f"| {task} | {recipe if is_scbert else '(same folds)'} | {group['model']} | "
                f"{len(group['folds'])} | {_pm(group, 'accuracy')} | {_pm(group, 'macro_f1')} | "
                f"{ece} |"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    lines = [
        "| task | recipe | model | folds | accuracy | macro F1 | ECE (before → after) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        *rows(Path(args.reports)),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
