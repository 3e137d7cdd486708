"""Fine-tuning's losses, the collapse of the published head and its detection, and temperature
scaling (fitted, stored with the model, applied wherever the model is loaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, random_tokens, tiny_config

from scbert import ScBertConfig, load_pretrained, save_pretrained
from scbert_platform.data.loader import ShardInfo, iter_local_batches
from scbert_platform.data.splits import CellSplit
from scbert_platform.params import Params
from scbert_platform.train.distributed import CollapsedRun, calibrate_and_check, read_calibration
from scbert_platform.train.loop import ClassLoss, fit_temperature, predict
from scbert_platform.train.metrics import (
    expected_calibration_error,
    reliability_bins,
    selective_scores,
)


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(4000, 6))
    true_t = 2.5
    p = torch.softmax(torch.as_tensor(logits) / true_t, dim=1).numpy()
    labels = np.array([rng.choice(6, p=row) for row in p])
    labels[:50] = -1  # unlabelled cells are skipped
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    assert fit_temperature(logits[:1], labels[:1]) == 1.0

    # the minimiser of the NLL: no temperature on a fine grid around it does better
    known = labels >= 0

    def nll(temperature: float) -> float:
        z = torch.as_tensor(logits[known]) / temperature
        return float(torch.nn.functional.cross_entropy(z, torch.as_tensor(labels[known])))

    assert all(nll(t) <= nll(t * factor) for factor in np.linspace(0.9, 1.1, 41))


def test_temperature_at_the_ends_of_its_range() -> None:
    """Every cell called right by separable logits: the sharpest temperature searched; logits
    that point away from the labels: the softest."""
    from scbert_platform.train.loop import LOG_T_BOUND

    logits = np.eye(3)[[0, 1, 2, 0, 1]] * 5.0
    assert fit_temperature(logits, np.array([0, 1, 2, 0, 1])) == pytest.approx(np.exp(-LOG_T_BOUND))
    assert fit_temperature(logits, np.array([1, 2, 0, 2, 0])) == pytest.approx(np.exp(LOG_T_BOUND))


def test_ece_and_selective_scores_on_cells_worked_by_hand() -> None:
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # bins: 0.9 (2 cells, accuracy 0.5, gap 0.4), 0.6 (1 cell, gap 0.4), 0.7 (1 cell, gap 0.3)
    assert expected_calibration_error(proba, y, n_bins=10) == pytest.approx(
        0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3
    )
    assert [b["n"] for b in reliability_bins(proba, y)] == [1, 1, 2]
    scores = selective_scores(proba, y, threshold=0.65)
    assert scores["kept"] == 0.75  # the 0.6 cell is Unassigned
    assert scores["accuracy_kept"] == pytest.approx(2 / 3)
    assert scores["unassigned_correct"] == pytest.approx(1 / 3)
    assert scores["unassigned_wrong"] == 0.0


def test_losses() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, -1])
    counts = torch.tensor([100.0, 10.0, 1.0])
    ce = ClassLoss("ce")(logits, labels, 0)
    assert float(ce) == pytest.approx(float(F.cross_entropy(logits[:7], labels[:7])))
    smoothed = ClassLoss("ce", label_smoothing=0.1)(logits, labels, 0)
    assert float(smoothed) != pytest.approx(float(ce))
    focal = ClassLoss("focal")(logits, labels, 0)
    assert 0 < float(focal) < float(ce)  # down-weights the cells already right
    ldam = ClassLoss("ldam_drw", counts=counts, total_steps=100)
    early, late = ldam(logits, labels, 10), ldam(logits, labels, 90)
    assert float(early) > float(ce)  # the margins only raise the true class's bar
    assert float(late) != pytest.approx(float(early))  # re-weighted in the last 20% of steps
    late.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[7].abs().sum() == 0
    assert float(ClassLoss("focal")(logits[7:], labels[7:], 0)) == 0.0  # no labelled cell


def test_a_dead_relu_head_predicts_one_class_and_learns_nothing_leaky_does_not() -> None:
    """The root cause of collapsed fine-tuning runs (docs/training.md): once every gene's scalar
    is below zero, the published ReLU head sees a constant and passes no gradient back."""
    tokens = random_tokens(6, 24, 5, seed=1)
    for activation, dead in (("relu", True), ("leaky_relu", False)):
        model = build_model(tiny_config(n_classes=3, cls_activation=activation), seed=0)
        with torch.no_grad():
            model.head.per_gene.bias.fill_(-100.0)
        logits = model(tokens)
        logits.logsumexp(dim=1).sum().backward()
        spread = float((logits - logits[0]).abs().max())
        encoder_grad = float(model.head.per_gene.weight.grad.abs().sum())
        assert (spread == 0.0) is dead and (encoder_grad == 0.0) is dead, activation


def test_head_activation_is_saved_with_the_model(tmp_path: Path) -> None:
    config = tiny_config(n_classes=3, cls_activation="leaky_relu")
    save_pretrained(build_model(config), tmp_path / "m", panel=[f"g{i}" for i in range(24)],
                    classes=["a", "b", "c"])  # fmt: skip
    assert load_pretrained(tmp_path / "m").model.config.cls_activation == "leaky_relu"
    older = ScBertConfig.from_dict({k: v for k, v in config.to_dict().items()
                                    if k != "cls_activation"})  # fmt: skip
    assert older.cls_activation == "relu"  # checkpoints from before: the published head
    with pytest.raises(ValueError, match="cls_activation"):
        tiny_config(cls_activation="tanh")


def _pbmc_model(shards: Path, tmp: Path, *, one_class: bool) -> Path:
    info = ShardInfo.read(shards)
    config = tiny_config(n_genes=info.n_genes, n_classes=len(info.labels))
    model = build_model(config, seed=0)
    with torch.no_grad():  # spread logits: an overconfident model that calibration cools down
        model.head.fc3.weight.mul_(40.0)
        if one_class:
            model.head.fc3.bias[3] = 1e4
    return save_pretrained(model, tmp / "model", panel=info.panel, classes=info.labels)


def test_calibration_is_folded_into_the_model_and_recorded(
    pbmc_shards: Path, tmp_path: Path
) -> None:
    model_dir = _pbmc_model(pbmc_shards, tmp_path, one_class=False)
    split = CellSplit(test_folds=(0,), val_folds=(1,))
    batches = iter_local_batches(pbmc_shards, 5, split=split, role="val", batch_size=64)
    _, before = predict(load_pretrained(model_dir).model, batches, device=torch.device("cpu"))
    metrics = calibrate_and_check(model_dir, pbmc_shards, split, Params())
    record = read_calibration(model_dir)
    assert record is not None and record["temperature"] == metrics["calibration/temperature"]
    t = record["temperature"]
    assert t > 1.5  # the overconfident model is cooled
    assert metrics["val/ece"] < metrics["val/ece_uncalibrated"]
    batches = iter_local_batches(pbmc_shards, 5, split=split, role="val", batch_size=64)
    _, after = predict(load_pretrained(model_dir).model, batches, device=torch.device("cpu"))
    expected = torch.softmax(torch.log(torch.as_tensor(before)) / t, dim=1).numpy()
    np.testing.assert_allclose(after, expected, atol=1e-5)  # what every loader of it gets
    assert (after.argmax(1) == before.argmax(1)).all()  # the calls do not change


def test_a_model_predicting_one_class_fails_with_the_reason(
    pbmc_shards: Path, tmp_path: Path
) -> None:
    model_dir = _pbmc_model(pbmc_shards, tmp_path, one_class=True)
    split = CellSplit(test_folds=(0,), val_folds=(1,))
    with pytest.raises(CollapsedRun, match="the kept model predicts one class"):
        calibrate_and_check(model_dir, pbmc_shards, split, Params())
    assert read_calibration(model_dir) is None  # nothing is calibrated or recorded
