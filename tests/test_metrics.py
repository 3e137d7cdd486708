"""Evaluation metrics: annotation report, Unassigned predictions, masked-token accuracy, figures."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from scbert_platform.train.metrics import (
    classification_report,
    confusion_matrix_png,
    masked_token_accuracy,
    masked_token_counts,
    mean_per_class_f1,
    report_markdown,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_hand_computed_example() -> None:
    # B: tp 2, fp 1, fn 1 -> P = R = F1 = 2/3;  T: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8
    # NK: tp 0, fp 0, fn 1 -> P 0 (0/0), R 0, F1 0
    report = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], ["B", "T", "NK"])
    assert report["n"] == 6
    assert report["n_unassigned"] == 0
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert report["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.8 + 1 * 0.0) / 6)
    assert report["per_class"]["B"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert report["per_class"]["T"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert report["per_class"]["NK"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["unassigned_per_class"] == [0, 0, 0]
    assert report["labels"] == ["B", "T", "NK"]
    json.dumps(report)  # plain Python types, ready for mlflow.log_dict


def test_accepts_numpy_and_torch_ids() -> None:
    as_list = classification_report([0, 1, 1], [0, 1, 0], ["a", "b"])
    as_numpy = classification_report(
        np.array([0, 1, 1], dtype=np.int8), np.array([0, 1, 0]), ["a", "b"]
    )
    as_torch = classification_report(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ("a", "b"))
    assert as_list == as_numpy == as_torch


def test_absent_classes_are_reported_without_warnings() -> None:
    labels = ["A", "B", "C", "D"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report([0, 0, 1, 1], [0, 1, 1, 1], labels)
    assert len(report["confusion_matrix"]) == 4
    assert all(len(row) == 4 for row in report["confusion_matrix"])
    assert report["confusion_matrix"][2] == [0, 0, 0, 0]
    assert report["per_class"]["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["D"]["support"] == 0
    # macro F1 over the two classes of this split: A (P 1, R 1/2) and B (P 2/3, R 1)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_a_predicted_class_absent_from_truth_counts_in_macro_f1() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report([0, 0, 1, 1], [0, 2, 1, 1], ["A", "B", "C"])
    # A: P 1, R 1/2, F1 2/3; B: F1 1; C: predicted once, never true: F1 0
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert report["per_class"]["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["confusion_matrix"][0] == [1, 0, 1]


def test_unassigned_predictions_are_wrong_and_counted() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report([0, 0, 1, 1, 1], [0, -1, 1, -1, -1], ["B", "T"])
    assert report["n_unassigned"] == 3
    assert report["accuracy"] == pytest.approx(2 / 5)
    # B: tp 1, fn 1 (unassigned), no fp -> P 1, R 1/2, F1 2/3; T: tp 1, fn 2 -> P 1, R 1/3, F1 1/2
    assert report["per_class"]["B"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert report["per_class"]["T"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3}
    )
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert report["weighted_f1"] == pytest.approx((2 * 2 / 3 + 3 * 0.5) / 5)
    assert report["confusion_matrix"] == [[1, 0], [0, 1]]
    assert report["unassigned_per_class"] == [1, 2]
    rows = np.array(report["confusion_matrix"]).sum(axis=1) + report["unassigned_per_class"]
    assert rows.tolist() == [report["per_class"][c]["support"] for c in ("B", "T")]


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "match"),
    [
        ([0, 1], [0], ["a", "b"], "2 cells but y_pred has 1"),
        ([0, 2], [0, 1], ["a", "b"], r"y_true holds ids \[2\] outside 0\.\.1"),
        ([0, -1], [0, 1], ["a", "b"], r"y_true holds ids \[-1\]"),
        ([0, 1], [0, -2], ["a", "b"], r"y_pred holds ids \[-2\] outside -1\.\.1"),
        ([0.0, 1.0], [0, 1], ["a", "b"], "integer class ids"),
        ([], [], ["a", "b"], "no cells"),
        ([0, 1], [0, 1], ["a", "a"], "unique"),
        ([0, 1], [0, 1], [], "non-empty"),
    ],
)
def test_bad_report_input_raises(
    y_true: list[float], y_pred: list[int], labels: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        classification_report(y_true, y_pred, labels)


def test_masked_token_accuracy_ignores_unmasked_positions() -> None:
    logits = torch.full((2, 3, 4), -1.0)
    logits[0, 0, 1] = 5.0  # predicts 1
    logits[0, 1, 2] = 5.0  # predicts 2
    logits[0, 2, 3] = 5.0  # predicts 3
    logits[1, 0, 0] = 5.0  # predicts 0
    logits[1, 1, 1] = 5.0  # predicts 1
    logits[1, 2, 2] = 5.0  # predicts 2
    labels = torch.tensor([[1, -100, 0], [-100, 1, 3]])  # counted: right, wrong, right, wrong
    assert masked_token_accuracy(logits, labels) == (0.5, 4)
    # the same labels with another ignore value
    assert masked_token_accuracy(logits, labels.masked_fill(labels == -100, 6), ignore_index=6) == (
        0.5,
        4,
    )
    assert masked_token_accuracy(logits.bfloat16(), labels) == (0.5, 4)
    # the counts behind it, which sum over batches (evaluate_pretraining)
    assert masked_token_counts(logits, labels) == (2, 4)
    assert masked_token_counts(logits[:1], labels[:1]) == (1, 2)


def test_masked_token_accuracy_with_nothing_masked_and_bad_shapes() -> None:
    assert masked_token_accuracy(torch.zeros(2, 3, 4), torch.full((2, 3), -100)) == (0.0, 0)
    assert masked_token_counts(torch.zeros(2, 3, 4), torch.full((2, 3), -100)) == (0, 0)
    with pytest.raises(ValueError, match="vocab axis"):
        masked_token_accuracy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_confusion_matrix_png_is_a_png_scaled_by_class_count(tmp_path: Path) -> None:
    labels = ["B cell", "CD14+ monocyte", "NK", "T"]
    report = classification_report([0, 1, 2, 3, 3, 1], [0, 1, 2, 3, -1, 3], labels)
    small = confusion_matrix_png(
        report["confusion_matrix"],
        labels,
        tmp_path / "figs" / "cm.png",
        unassigned=report["unassigned_per_class"],
    )
    assert small == tmp_path / "figs" / "cm.png"
    counts = confusion_matrix_png(
        report["confusion_matrix"], labels, tmp_path / "counts.png", normalize=False
    )
    many = [f"cell type {i}" for i in range(30)]
    large = confusion_matrix_png(np.eye(30, dtype=int) * 7, many, tmp_path / "large.png")
    for path in (small, counts, large):
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert png_size(large)[0] > 2 * png_size(small)[0]


def test_confusion_matrix_png_rejects_a_mismatched_matrix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        confusion_matrix_png([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="unassigned has 1 counts"):
        confusion_matrix_png([[1, 0], [0, 1]], ["a", "b"], tmp_path / "x.png", unassigned=[1])


def test_png_opens_no_window_and_leaves_the_backend_alone(tmp_path: Path) -> None:
    # a fresh interpreter: importing the module loads no matplotlib; drawing never imports pyplot
    script = f"""
import sys
from scbert_platform.train.metrics import confusion_matrix_png
assert "matplotlib" not in sys.modules, "import drew in matplotlib"
confusion_matrix_png([[3, 1], [0, 4]], ["a", "b"], {str(tmp_path / "cm.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
import matplotlib
assert matplotlib.rcParams["backend"] == "TkAgg", matplotlib.rcParams["backend"]
"""
    env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "TkAgg", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, check=True, timeout=120)
    assert (tmp_path / "cm.png").read_bytes()[:8] == PNG_MAGIC


def test_report_markdown_lists_every_class() -> None:
    labels = ["B", "T|reg", "NK", "absent"]
    report = classification_report([0, 1, 2, 2], [0, 1, 2, -1], labels)
    text = report_markdown(report)
    lines = text.splitlines()
    assert lines[0] == "| class | precision | recall | F1 | support |"
    assert len([line for line in lines if line.startswith("| ")]) == 2 + len(labels)
    for name in ("B", "T\\|reg", "NK", "absent"):
        assert any(line.startswith(f"| {name} |") for line in lines)
    assert "| NK | 1.000 | 0.500 | 0.667 | 2 |" in lines
    assert lines[-1] == (
        "accuracy 0.7500, macro F1 0.8889, weighted F1 0.8333 over 4 cells (1 unassigned)"
    )


def test_per_class_f1_is_averaged_over_the_folds_that_test_the_class() -> None:
    labels = ["B", "T", "NK"]
    fold_a = classification_report([0, 0, 1, 1], [0, 0, 1, 0], labels)  # no NK cell tested
    fold_b = classification_report([0, 1, 2], [0, 1, 1], labels)  # NK tested, never called
    f1 = mean_per_class_f1([fold_a, fold_b])
    assert f1["B"] == pytest.approx((0.8 + 1.0) / 2)
    assert f1["T"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert f1["NK"] == 0.0  # only fold b tests it: its 0, not a mean with fold a's empty 0
    assert mean_per_class_f1([fold_a]) == {"B": 0.8, "T": pytest.approx(2 / 3)}  # NK untested
