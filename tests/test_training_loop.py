"""The training loop without Ray: objectives, accumulation, checkpoint resume, freezing."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, random_tokens, tiny_config

from scbert_platform.data.loader import ShardInfo, iter_local_batches
from scbert_platform.params import TrainParams
from scbert_platform.train.loop import (
    ClassLoss,
    CompiledWithFallback,
    LoopHooks,
    LoopState,
    NonFiniteLoss,
    add_to_mean,
    build_optimizer,
    evaluate_pretraining,
    finetune_loss,
    pretrain_loss,
    restore_training_state,
    run_loop,
    set_trainable,
    steps_per_epoch,
    training_state,
)

CPU = torch.device("cpu")


def token_batches(n_batches: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Learnable cells: gene g, when expressed, always has bin 1 + g % 5."""
    pattern = 1 + torch.arange(25) % 5
    pattern[-1] = 0  # the appended position
    batches = []
    for i in range(n_batches):
        expressed = random_tokens(4, 24, 5, seed=seed + i) > 0
        batches.append({"tokens": pattern * expressed, "label": torch.zeros(4)})
    return batches


def pretrain_setup(params: TrainParams, seed: int = 0) -> tuple[Any, ...]:
    torch.manual_seed(seed)
    model = build_model(tiny_config(), seed=seed)
    optimizer, scheduler = build_optimizer(model, params)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> Any:
        return pretrain_loss(m, batch, n_bins=5, generator=generator, params=params, device=CPU)

    return model, optimizer, scheduler, generator, loss_fn


def quiet_hooks(reports: list[tuple[dict[str, float], bool]]) -> LoopHooks:
    return LoopHooks(report=lambda m, due: reports.append((m, due)), log=lambda _: None)


def train(
    setup: tuple[Any, ...],
    epochs: Any,
    params: TrainParams,
    total_steps: int,
    *,
    state: LoopState | None = None,
    reports: list[tuple[dict[str, float], bool]] | None = None,
) -> LoopState:
    """run_loop on a ``pretrain_setup``, reports collected into ``reports``."""
    model, optimizer, scheduler, _, loss_fn = setup
    return run_loop(
        model,
        optimizer,
        scheduler,
        loss_fn,
        epochs,
        params=params,
        total_steps=total_steps,
        state=state or LoopState(),
        hooks=quiet_hooks([] if reports is None else reports),
        device=CPU,
    )


def test_pretraining_loss_goes_down() -> None:
    params = TrainParams(
        lr=3e-3, grad_accum=1, schedule="constant", ckpt_every=0, val_every=0, log_every=1
    )
    setup = pretrain_setup(params)
    data = token_batches(4)
    reports: list[tuple[dict[str, float], bool]] = []
    state = train(setup, lambda epoch: data, params, 60, reports=reports)
    assert (state.step, state.epoch, state.batches_done) == (60, 14, 4)  # 15 epochs of 4
    losses = [m["train/loss"] for m, _ in reports]
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8
    assert reports[-1][1] is True  # the final step always asks for a checkpoint


def test_accumulation_steps_once_per_grad_accum_micro_batches() -> None:
    params = TrainParams(grad_accum=3, ckpt_every=2, val_every=0, log_every=1)
    setup = pretrain_setup(params)
    reports: list[tuple[dict[str, float], bool]] = []
    state = train(setup, lambda epoch: token_batches(7), params, 4, reports=reports)
    assert len(reports) == 4 and state.step == 4
    assert [due for _, due in reports] == [False, True, False, True]
    assert state.cells == 4 * 3 * 4  # 4 steps x 3 micro-batches x 4 cells


def test_resume_from_a_checkpoint_continues_exactly() -> None:
    """Stopping at step 3 and resuming from the saved state gives the uninterrupted run."""
    params = TrainParams(grad_accum=2, ckpt_every=0, val_every=0, warmup_steps=2)
    data = token_batches(5)

    def epochs(epoch: int) -> list[dict[str, Any]]:
        return data

    setup = pretrain_setup(params)
    train(setup, epochs, params, 6)
    uninterrupted = copy.deepcopy(setup[0].state_dict())

    model, optimizer, scheduler, generator, _ = setup = pretrain_setup(params)
    state = train(setup, epochs, params, 3)
    saved = copy.deepcopy(training_state(optimizer, scheduler, state, generator))
    weights = copy.deepcopy(model.state_dict())

    model, optimizer, scheduler, generator, _loss_fn = setup = pretrain_setup(params, seed=1)
    model.load_state_dict(weights)
    state = restore_training_state(saved, optimizer, scheduler, generator)
    assert (state.step, state.epoch, state.batches_done) == (3, 1, 1)  # spans epochs
    train(setup, epochs, params, 6, state=state)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_reports_come_every_log_every_steps_and_at_checkpoints() -> None:
    params = TrainParams(grad_accum=1, ckpt_every=4, val_every=0, log_every=3)
    setup = pretrain_setup(params)
    reports: list[tuple[dict[str, float], bool]] = []
    train(setup, lambda epoch: token_batches(5), params, 10, reports=reports)
    assert [due for _, due in reports] == [False, True, False, True, False, True]  # 3 4 6 8 9 10


def test_a_reported_loss_is_its_steps_own_whatever_the_reporting_interval() -> None:
    """The loop keeps the loss on the device between reports (no host sync per step): a step's
    reported loss is the same whether the steps before it were reported or not."""
    by_interval = {}
    for log_every in (1, 3):
        params = TrainParams(grad_accum=2, ckpt_every=0, val_every=0, log_every=log_every)
        reports: list[tuple[dict[str, float], bool]] = []
        train(pretrain_setup(params), lambda epoch: token_batches(5), params, 9, reports=reports)
        by_interval[log_every] = [m["train/loss"] for m, _ in reports]
    assert len(by_interval[1]) == 9 and len(by_interval[3]) == 3
    assert by_interval[3] == pytest.approx(by_interval[1][2::3], abs=1e-6)


def test_compile_falls_back_to_eager_when_compiling_fails() -> None:
    model = build_model(tiny_config(), seed=0).eval()
    tokens = torch.stack([b["tokens"] for b in token_batches(2)]).flatten(0, 1)
    expected = model(tokens)

    def broken(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    lines: list[str] = []
    wrapped = CompiledWithFallback(model, backend=broken, log=lines.append)
    for _ in range(2):
        torch.testing.assert_close(wrapped(tokens), expected)
    assert wrapped.failed and len(lines) == 1 and "torch.compile failed" in lines[0]
    assert "no compiler here" in lines[0]
    assert list(wrapped.parameters()) == list(model.parameters())  # the optimiser's view

    working = CompiledWithFallback(model, backend="eager", log=lines.append)
    torch.testing.assert_close(working(tokens), expected)
    assert not working.failed and len(lines) == 1


def test_a_loss_that_is_not_finite_stops_the_run() -> None:
    params = TrainParams(grad_accum=1, ckpt_every=0, val_every=0, log_every=1)
    model, optimizer, scheduler, _, _ = pretrain_setup(params)

    def nan_loss(m: torch.nn.Module, batch: dict[str, Any]) -> Any:
        return m(batch["tokens"]).sum() * float("nan"), {"cells": 4}

    with pytest.raises(NonFiniteLoss, match="the training loss is nan at step 1"):
        train((model, optimizer, scheduler, None, nan_loss), lambda e: token_batches(3), params, 3)


def test_empty_training_split_is_an_error() -> None:
    params = TrainParams(grad_accum=1)
    setup = pretrain_setup(params)
    with pytest.raises(RuntimeError, match="no batches"):
        train(setup, lambda epoch: [], params, 2)


def test_published_freeze_trains_the_last_block_norm_and_head() -> None:
    model = build_model(tiny_config(depth=3, n_classes=4))
    names = set_trainable(model, "published")
    assert names and all(n.startswith(("norm.", "head.", "encoder.blocks.2.")) for n in names)
    assert any(n.startswith("encoder.blocks.2.") for n in names)
    assert len(set_trainable(model, "last_k:2")) > len(names)
    assert len(set_trainable(model, "all")) == sum(1 for _ in model.parameters())
    with pytest.raises(ValueError, match="unfreeze"):
        set_trainable(model, "some")


def test_gene_dropout_changes_the_fine_tuning_input_reproducibly() -> None:
    model = build_model(tiny_config(n_classes=3)).eval()  # eval: no dropout of the model's own
    tokens = random_tokens(8, tiny_config().n_genes, 5, seed=2)
    batch = {"tokens": tokens, "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}

    def loss(p: float, seed: int) -> float:
        generator = torch.Generator().manual_seed(seed)
        value, _ = finetune_loss(
            model, batch, loss=ClassLoss(), step=0, device=CPU, gene_dropout=p, n_bins=5,
            generator=generator,
        )  # fmt: skip
        return float(value)

    plain = loss(0.0, 0)
    assert loss(0.3, 0) != plain  # the model saw other input
    assert loss(0.3, 0) == loss(0.3, 0) != loss(0.3, 1)  # drawn from the run's generator
    assert torch.equal(batch["tokens"], tokens)  # the batch itself is not modified


def test_class_weights_are_inverse_frequency_with_mean_one() -> None:
    from scbert_platform.train.loop import class_weights

    weights = class_weights({"a": 10, "b": 30, "c": 0}, ["a", "b", "c"])
    assert weights.tolist() == pytest.approx([1.5, 0.5, 0.0])


def test_weight_averaging_keeps_the_mean_of_the_snapshots() -> None:
    snapshots = [build_model(tiny_config(), seed=seed).state_dict() for seed in range(3)]
    mean: dict[str, torch.Tensor] = {}
    for count, weights in enumerate(snapshots, start=1):
        add_to_mean(mean, weights, count)
    for name, value in snapshots[0].items():
        if value.is_floating_point():
            expected = torch.stack([s[name] for s in snapshots]).mean(0)
            assert torch.allclose(mean[name], expected, atol=1e-6), name
        else:
            assert torch.equal(mean[name], snapshots[-1][name]), name
    assert any(not torch.equal(snapshots[0][n], snapshots[1][n]) for n in mean)  # they differ
    model = build_model(tiny_config())
    model.load_state_dict(mean)  # a model of the same shape takes it


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(1000, TrainParams(workers=2, batch_size=3, grad_accum=10)) == 16
    assert steps_per_epoch(10, TrainParams(batch_size=3, grad_accum=60)) == 1


def test_masked_validation_on_real_cells(pbmc_shards: Path) -> None:
    info = ShardInfo.read(pbmc_shards)
    model = build_model(tiny_config(n_genes=info.n_genes, gene_embedding="learned"))
    batches = list(iter_local_batches(pbmc_shards, 5, folds=[0], batch_size=64))
    first = evaluate_pretraining(model, batches, n_bins=5, seed=0, device=CPU, precision="fp32")
    again = evaluate_pretraining(model, batches, n_bins=5, seed=0, device=CPU, precision="fp32")
    assert first == again  # a fixed masking seed: comparable across steps
    assert 0 <= first["val/masked_acc"] <= 1 and first["val/loss"] > 0


@torch.no_grad()
def test_masked_validation_counts_as_the_metric_does() -> None:
    """evaluate_pretraining's accuracy is metrics.masked_token_accuracy over all its batches."""
    from scbert import mask_tokens
    from scbert_platform.train.metrics import masked_token_accuracy

    model, batches = build_model(tiny_config(), seed=0).eval(), token_batches(3)
    result = evaluate_pretraining(model, batches, n_bins=5, seed=7, device=CPU, precision="fp32")
    generator = torch.Generator().manual_seed(7)
    masked = [mask_tokens(b["tokens"].long(), n_bins=5, generator=generator) for b in batches]
    logits = torch.cat([model(tokens) for tokens, _ in masked])
    accuracy, n_counted = masked_token_accuracy(logits, torch.cat([y for _, y in masked]))
    assert n_counted > 0
    assert result["val/masked_acc"] == pytest.approx(accuracy)
