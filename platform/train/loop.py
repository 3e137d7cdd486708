"""The training loops: plain functions over any iterable of batches (no Ray here).

``run_loop`` drives both objectives: micro-batches -> loss / ``grad_accum`` -> backward (without
DDP's all-reduce between accumulation steps, ``no_sync``) -> clip -> Adam -> schedule, stepped per
optimiser step. It reports progress, validates every ``val_every`` steps and asks for a checkpoint
every ``ckpt_every`` steps through callbacks, which ``scbert_platform.train.distributed``
connects to Ray Train and MLflow and which tests connect to lists.

- Pretraining (published objective): mask ``mask_prob`` of each cell's non-zero tokens
  (``scbert.mask_tokens``), cross-entropy on the chosen positions; validation: masked-token
  accuracy and loss on a held-out fold with a fixed masking seed.
- Fine-tuning: the cell-type head, cross-entropy (optionally class-weighted), the published
  freezing by default; validation: accuracy and macro F1, early stopping on val macro F1, and the
  best validation step's weights are the result (the test split is evaluated by the caller).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scbert import IGNORE_INDEX, ScBert, ScBertConfig, drop_genes, mask_tokens
from scbert_platform.params import LOSSES as LOSSES  # train.loss's names (checked by TrainParams)
from scbert_platform.params import ModelParams, TrainParams, unfrozen_blocks
from scbert_platform.train.schedule import make_scheduler

# fit_temperature searches T within [e^-LOG_T_BOUND, e^LOG_T_BOUND]
LOG_T_BOUND = 7.0

Batch = dict[str, Any]


def model_config(
    model: ModelParams, *, n_genes: int, n_classes: int | None, gene2vec: bool, checkpointing: bool
) -> ScBertConfig:
    """ScBertConfig from the ``model`` params section and the data's panel size."""
    return model.config(
        n_genes=n_genes, n_classes=n_classes, gene2vec=gene2vec, checkpointing=checkpointing
    )


def set_trainable(model: ScBert, unfreeze: str) -> list[str]:
    """Fine-tuning freeze. ``published``: only the final norm, the last encoder block and the head
    train (the paper's text; the published script's ``layers[-2]`` is the second-to-last block,
    docs/model.md). ``all``: everything. ``last_k:N``: the last N blocks, norm and head.
    Returns the names of the trainable parameters."""
    n_blocks = len(model.encoder.blocks)
    first_trained = n_blocks - unfrozen_blocks(unfreeze, n_blocks)
    trained_prefixes = ["norm.", "head."]
    trained_prefixes += [f"encoder.blocks.{i}." for i in range(first_trained, n_blocks)]
    if unfreeze == "all":
        trained_prefixes = [""]
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name.startswith(p) for p in trained_prefixes))
        if parameter.requires_grad:
            names.append(name)
    return names


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU by default (``auto``), or when asked for (``train.precision``,
    checked by ``TrainParams``); fp32 otherwise."""
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_device(array: Any, device: torch.device) -> torch.Tensor:
    """A batch's array as a tensor on ``device``: to a GPU through pinned memory, without
    blocking the host (the model's kernels queue behind the copy)."""
    tensor = torch.as_tensor(array)
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def prepare_device(device: torch.device, precision: str) -> None:
    """On CUDA: this worker's GPU becomes the current one (with several workers per node each
    has its own), and fp32 matrix products may use TF32 unless fp32 was asked for. TF32 only
    touches what runs outside bf16 autocast, and keeps more mantissa bits (10) than bf16 (7)."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    allow = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


class CompiledWithFallback(torch.nn.Module):
    """``module``'s forward through ``torch.compile``; if compiling fails (no C++ compiler for
    the CPU backend, an operation the compiler does not take), one warning and eager from then
    on. Parameters and ``train()`` are the module's own; checkpoints save the module."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        backend: Any = "inductor",
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ) -> None:
        super().__init__()
        self.module = module
        self.log = log
        # not a submodule: the compiled wrapper holds the same parameters under other names
        object.__setattr__(self, "compiled", torch.compile(module, backend=backend))
        self.failed = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)  # type: ignore[operator]
            except Exception as err:  # Dynamo and Inductor errors share no base class
                self.failed = True
                inner = getattr(err, "inner_exception", None) or err.__cause__
                while isinstance(inner, Exception):  # the backend's own error, not Dynamo's
                    err, inner = inner, getattr(inner, "inner_exception", None) or inner.__cause__
                reason = (str(err).strip().splitlines() or [""])[0][:200]
                self.log(
                    f"warning: torch.compile failed ({type(err).__name__}: {reason}); "
                    "training goes on without it (train.compile=false skips the attempt)"
                )
        return self.module(*args, **kwargs)


def pretrain_loss(
    model: torch.nn.Module,
    batch: Batch,
    *,
    n_bins: int,
    generator: torch.Generator,
    params: TrainParams,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked reconstruction: (loss, counts for logging)."""
    tokens = to_device(batch["tokens"], device).long()
    masked, labels = mask_tokens(
        tokens,
        n_bins=n_bins,
        generator=generator,
        mask_prob=params.mask_prob,
        replace_prob=params.replace_prob,
    )
    logits = model(masked)  # (b, n, vocab)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )
    return loss, {"cells": tokens.shape[0]}


@dataclass(frozen=True)
class ClassLoss:
    """The fine-tuning loss (``train.loss``, docs/training.md "Losses").

    ``ce``: cross-entropy, with ``class_weight`` (``train.class_weights``) and label smoothing.
    ``focal``: focal loss, gamma 2 (Lin et al. 2017), class-weighted likewise.
    ``ldam_drw``: label-distribution-aware margins (Cao et al. 2019), margin C / n_c^(1/4) with
    the largest 0.5 (on our unnormalised logits, so without the paper's scale s=30, which is
    for cosine classifiers), and deferred re-weighting: the inverse-frequency weights join only
    for the last ``drw_fraction`` of the steps.
    """

    kind: str = "ce"
    class_weight: torch.Tensor | None = None
    label_smoothing: float = 0.0
    counts: torch.Tensor | None = None  # cells per class (ldam_drw)
    total_steps: int = 0
    drw_fraction: float = 0.2

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        if self.kind == "ce":
            return F.cross_entropy(
                logits,
                labels,
                weight=self.class_weight,
                ignore_index=-1,
                label_smoothing=self.label_smoothing,
            )
        known = labels >= 0
        logits, labels = logits[known], labels[known]
        if labels.numel() == 0:
            return logits.sum() * 0.0  # a batch of unlabelled cells: nothing to learn
        if self.kind == "focal":
            log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]
            loss = -((1 - log_p.exp()) ** 2) * log_p
            if self.class_weight is None:
                return loss.mean()
            w = self.class_weight[labels]
            return (loss * w).sum() / w.sum()
        assert self.counts is not None, "ldam_drw needs the class counts"
        margins = self.counts.clamp(min=1) ** -0.25
        margins = margins * (0.5 / margins.max())
        shifted = logits - margins[None, :] * F.one_hot(labels, logits.shape[1])
        deferred = step >= int((1 - self.drw_fraction) * self.total_steps)
        weight = _inverse_frequency(self.counts) if deferred else None
        return F.cross_entropy(shifted, labels, weight=weight)


def _inverse_frequency(counts: torch.Tensor) -> torch.Tensor:
    present = counts > 0
    weights = torch.where(present, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return weights * present.sum() / weights.sum()


def finetune_loss(
    model: torch.nn.Module,
    batch: Batch,
    *,
    loss: ClassLoss,
    step: int,
    device: torch.device,
    gene_dropout: float = 0.0,
    n_bins: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cell-type loss (cells without a known label are ignored); with ``gene_dropout``, each
    expressed gene of the batch is first read as not detected with that probability
    (``scbert.masking.drop_genes``, drawn from ``generator``)."""
    tokens = to_device(batch["tokens"], device)
    if gene_dropout > 0:
        assert generator is not None and n_bins > 0, "gene_dropout needs n_bins and a generator"
        tokens = drop_genes(tokens.long(), n_bins=n_bins, p=gene_dropout, generator=generator)
    labels = to_device(batch["label"], device).long()
    logits = model(tokens)
    return loss(logits.float(), labels, step), {"cells": tokens.shape[0]}


@torch.no_grad()
def evaluate_pretraining(
    model: ScBert,
    batches: Iterable[Batch],
    *,
    n_bins: int,
    seed: int,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Masked-token accuracy and loss with a fixed masking seed (comparable across steps)."""
    from scbert_platform.train.metrics import masked_token_counts

    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total_loss, correct, counted = 0.0, 0, 0
    for batch in batches:
        tokens = to_device(batch["tokens"], device).long()
        masked, labels = mask_tokens(tokens, n_bins=n_bins, generator=generator)
        with autocast(device, precision):
            logits = model(masked).float()
        chosen = labels != IGNORE_INDEX
        total_loss += float(F.cross_entropy(logits[chosen], labels[chosen], reduction="sum"))
        n_correct, n_chosen = masked_token_counts(logits, labels, IGNORE_INDEX)
        correct, counted = correct + n_correct, counted + n_chosen
    model.train(was_training)
    if counted == 0:
        return {}
    return {"val/loss": total_loss / counted, "val/masked_acc": correct / counted}


@torch.no_grad()
def predict(
    model: ScBert, batches: Iterable[Batch], *, device: torch.device, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """(true label ids, class probabilities (n, n_classes)) over ``batches``."""
    was_training = model.training
    model.eval()
    labels, probabilities = [], []
    for batch in batches:
        tokens = to_device(batch["tokens"], device)
        with autocast(device, precision):
            logits = model(tokens).float()
        probabilities.append(logits.softmax(-1).cpu().numpy())
        labels.append(np.asarray(batch["label"]))
    model.train(was_training)
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, model.config.n_classes or 0))
    return np.concatenate(labels), np.concatenate(probabilities)


def evaluate_classifier(
    model: ScBert,
    batches: Iterable[Batch],
    labels: list[str],
    *,
    device: torch.device,
    precision: str = "fp32",
    prefix: str = "val",
) -> tuple[dict[str, float], dict[str, Any]]:
    """(flat metrics ``{prefix}/accuracy``, ``{prefix}/macro_f1``, full report)."""
    y_true, proba = predict(model, batches, device=device, precision=precision)
    return score_predictions(y_true, proba, labels, prefix=prefix)


def score_predictions(
    y_true: np.ndarray, proba: np.ndarray, labels: list[str], *, prefix: str = "val"
) -> tuple[dict[str, float], dict[str, Any]]:
    """``evaluate_classifier``'s scores of predictions already made (cells labelled -1 are
    skipped): (flat metrics ``{prefix}/accuracy``, ``{prefix}/macro_f1``, full report)."""
    from scbert_platform.train.metrics import classification_report

    known = y_true >= 0
    report = classification_report(y_true[known], proba[known].argmax(-1), labels)
    flat = {f"{prefix}/accuracy": report["accuracy"], f"{prefix}/macro_f1": report["macro_f1"]}
    return flat, report


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the negative log-likelihood of
    ``softmax(logits / T)`` on held-out cells (cells with label -1 are skipped). 1.0 when fewer
    than two labelled cells are given.

    One dimension, convex in 1/T: the slope of the NLL in 1/T, E_softmax[z] - z_true, only grows
    with 1/T, so the optimum is where it crosses zero, found by bisection on log T within
    [e^-7, e^7] (an end where it does not cross: every cell called right and the logits
    separable, or logits pointing away from the labels). numpy only: a torch optimiser's first
    use imports torch's compiler (~3 s, in every run's driver)."""
    known = labels >= 0
    if known.sum() < 2:
        return 1.0
    z = np.asarray(logits[known], dtype=np.float64)
    z_true = z[np.arange(len(z)), np.asarray(labels[known])]

    def slope(log_t: float) -> float:
        scaled = z * math.exp(-log_t)
        p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        return float(((p * z).sum(axis=1) / p.sum(axis=1) - z_true).mean())

    sharp, soft = -LOG_T_BOUND, LOG_T_BOUND  # the slope is >= 0 at sharp, <= 0 at soft
    if slope(sharp) <= 0:
        return math.exp(sharp)
    if slope(soft) >= 0:
        return math.exp(soft)
    for _ in range(60):  # 14 / 2**60 in log T
        middle = (sharp + soft) / 2
        if slope(middle) > 0:
            sharp = middle
        else:
            soft = middle
    return math.exp((sharp + soft) / 2)


def class_counts(counts: dict[str, int], labels: list[str]) -> torch.Tensor:
    """Cells per class, in ``labels`` order (float32)."""
    return torch.tensor([counts.get(label, 0) for label in labels], dtype=torch.float32)


def class_weights(counts: dict[str, int], labels: list[str]) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    return _inverse_frequency(class_counts(counts, labels))


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run is failed, never registered."""


@dataclass
class LoopState:
    """Where training is: saved in every checkpoint and restored on resume."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in ``epoch``
    cells: int = 0  # cells trained on, this worker
    best_metric: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    stopped_early: bool = False
    averaged: int = 0  # validated snapshots in the weight average (train.average_from)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LoopHooks:
    """What the loop calls out to. ``report(metrics, checkpoint)`` gets the metrics every
    ``log_every`` steps and at validations and checkpoints (rank 0's are logged);
    ``checkpoint`` is True when a checkpoint is due. Every rank calls it at the same steps, as
    Ray Train's report is a barrier. ``validate()`` returns the same metrics on every rank."""

    report: Callable[[dict[str, float], bool], None]
    validate: Callable[[], dict[str, float]] | None = None
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    is_chief: bool = True
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    # the chief's step, total and metrics after every optimiser step (a progress bar's feed)
    progress: Callable[[int, int, dict[str, float]], None] | None = None


@dataclass
class _Training:
    """What ``run_loop``'s steps share: its arguments, and the running values between steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
    params: TrainParams
    total_steps: int
    state: LoopState
    hooks: LoopHooks
    device: torch.device
    early_stop_metric: str | None
    on_best: Callable[[], None] | None
    trainable: list[torch.nn.Parameter]
    started: float
    cells_at_start: int
    window: float  # when the chief last logged a progress line
    # the step's loss stays on the device: reading it (a host sync, which stalls a GPU's queue)
    # happens only on the steps whose metrics are reported, shown or logged, at most about once
    # a second otherwise (on a CPU every step is slower than that anyway)
    step_loss: torch.Tensor
    synced: float = -math.inf
    micro: int = 0  # micro-batches since the last optimiser step; accumulation spans epoch ends


def run_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
    epochs: Callable[[int], Iterable[Batch]],
    *,
    params: TrainParams,
    total_steps: int,
    state: LoopState,
    hooks: LoopHooks,
    device: torch.device,
    early_stop_metric: str | None = None,
    on_best: Callable[[], None] | None = None,
) -> LoopState:
    """Train until ``total_steps`` optimiser steps (or early stopping); returns the state.

    ``epochs(e)`` yields epoch ``e``'s micro-batches; on resume the first ``state.batches_done``
    of ``state.epoch`` are skipped. ``early_stop_metric``: the validation metric to maximise;
    ``on_best`` is called when it improves (to keep the best weights).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    run = _Training(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        params=params,
        total_steps=total_steps,
        state=state,
        hooks=hooks,
        device=device,
        early_stop_metric=early_stop_metric,
        on_best=on_best,
        trainable=trainable,
        started=time.perf_counter(),
        cells_at_start=state.cells,
        window=time.perf_counter(),
        step_loss=torch.zeros((), device=device),
    )
    while state.step < total_steps and not state.stopped_early:
        if _run_epoch(run, epochs(state.epoch)):
            break
    return state


def _run_epoch(run: _Training, batches: Iterable[Batch]) -> bool:
    """One epoch's micro-batches (those not done before a resume); True when training finished
    in it, else the state moves on to the next epoch."""
    state = run.state
    seen = 0
    for index, batch in enumerate(batches):
        seen += 1
        if index < state.batches_done:
            continue
        if _micro_step(run, index, batch) and _optimizer_step(run):
            return True
    if seen == 0:
        raise RuntimeError(f"epoch {state.epoch} gave no batches: the training split is empty")
    state.epoch += 1
    state.batches_done = 0
    return False


def _micro_step(run: _Training, index: int, batch: Batch) -> bool:
    """Forward and backward of one micro-batch; True when an optimiser step is due."""
    params, hooks, state = run.params, run.hooks, run.state
    sync = (run.micro + 1) % params.grad_accum == 0
    # between accumulation steps DDP must not all-reduce: forward and backward in no_sync
    guard = hooks.no_sync() if (hooks.no_sync and not sync) else contextlib.nullcontext()
    with guard:
        with autocast(run.device, params.precision):
            loss, info = run.loss_fn(run.model, batch)
        (loss / params.grad_accum).backward()
    run.micro += 1
    state.batches_done = index + 1
    state.cells += int(info["cells"])
    run.step_loss += loss.detach().float() / params.grad_accum
    return sync


def _optimizer_step(run: _Training) -> bool:
    """Clip, step the optimiser and the schedule, then validate, report and log when due; True
    when training is finished (``total_steps`` reached, or stopped early)."""
    params, state = run.params, run.state
    if params.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, params.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    now = time.perf_counter()
    validating = bool(run.hooks.validate and params.val_every)
    validating = validating and state.step % params.val_every == 0
    due = bool(params.ckpt_every and state.step % params.ckpt_every == 0)
    finished = state.step >= run.total_steps
    reporting = due or finished or validating or state.step % max(params.log_every, 1) == 0
    if not (reporting or now - run.synced >= 1.0):
        run.step_loss.zero_()
        return False
    run.synced = now
    metrics = _step_metrics(run, now)
    if validating:
        metrics |= run.hooks.validate()  # type: ignore[misc]
        _track_best(state, metrics, run.early_stop_metric, params.patience, run.on_best)
    finished = finished or state.stopped_early
    state.history.append({"step": float(state.step), **metrics})
    if reporting or finished:
        run.hooks.report(metrics, due or finished)
    _show_progress(run, now, metrics, finished)
    return finished


def _step_metrics(run: _Training, now: float) -> dict[str, float]:
    """The step's training metrics (the loss read from the device, then reset); a NaN or
    infinite loss raises ``NonFiniteLoss``."""
    state, step_loss = run.state, run.step_loss
    if not math.isfinite(float(step_loss)):
        raise NonFiniteLoss(
            f"the training loss is {float(step_loss)} at step {state.step}: lower "
            "train.lr, or set train.grad_clip (1.0 is a safe value)"
        )
    metrics = {
        "train/loss": float(step_loss),
        "train/lr": float(run.scheduler.get_last_lr()[0]),
        "train/cells_per_s": (state.cells - run.cells_at_start) / max(now - run.started, 1e-9),
        "train/epoch": float(state.epoch),
    }
    step_loss.zero_()
    return metrics


def _show_progress(run: _Training, now: float, metrics: dict[str, float], finished: bool) -> None:
    """The chief's progress feed after a step, and a log line every 10 s, at the first step and
    at the end."""
    hooks, state, total_steps = run.hooks, run.state, run.total_steps
    if hooks.is_chief and hooks.progress is not None:
        hooks.progress(state.step, total_steps, metrics)
    if hooks.is_chief and (now - run.window > 10 or finished or state.step == 1):
        run.window = now
        eta = (total_steps - state.step) * (now - run.started) / max(state.step, 1)
        hooks.log(
            f"step {state.step}/{total_steps} epoch {state.epoch} "
            f"loss {metrics['train/loss']:.4f} {metrics['train/cells_per_s']:.1f} cells/s "
            f"ETA {eta / 60:.1f} min"
            + "".join(f" {k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
        )


def _track_best(
    state: LoopState,
    metrics: dict[str, float],
    metric: str | None,
    patience: int,
    on_best: Callable[[], None] | None,
) -> None:
    if metric is None or metric not in metrics:
        return
    if metrics[metric] > state.best_metric:
        state.best_metric, state.best_step, state.evals_since_best = metrics[metric], state.step, 0
        if on_best:
            on_best()
    else:
        state.evals_since_best += 1
        if patience and state.evals_since_best >= patience:
            state.stopped_early = True


def cpu_copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's tensors, detached and copied to the CPU: weights kept aside while training
    goes on (the best validation's, the model's own while a checkpoint is written)."""
    return {name: value.detach().cpu().clone() for name, value in weights.items()}


def add_to_mean(
    mean: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], count: int
) -> None:
    """``weights`` (a state dict) into ``mean``, the running mean of ``count - 1`` state dicts
    before it (weight averaging, ``train.average_from``); kept on the CPU, each tensor in its own
    dtype. A buffer that is not float (a count, an index) keeps its latest value."""
    if count == 1:
        mean.clear()
        mean.update(cpu_copy(weights))
        return
    for name, value in weights.items():
        value = value.detach().cpu()
        if name in mean and value.is_floating_point():
            mean[name] += (value - mean[name]) / count
        else:
            mean[name] = value.clone()


def steps_per_epoch(n_cells: int, params: TrainParams) -> int:
    """Optimiser steps in one epoch of ``n_cells`` split over the workers."""
    per_worker = n_cells // max(params.workers, 1)
    micro = math.ceil(per_worker / params.batch_size)
    return max(micro // params.grad_accum, 1)


def build_optimizer(
    model: torch.nn.Module, params: TrainParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over the trainable parameters and the per-step learning-rate schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    scheduler = make_scheduler(
        optimizer,
        kind=params.schedule,
        min_lr=params.min_lr,
        first_cycle_steps=params.first_cycle_steps,
        cycle_mult=params.cycle_mult,
        warmup_steps=params.warmup_steps,
        gamma=params.gamma,
    )
    return optimizer, scheduler


def training_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LoopState,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Everything but the model weights that a resumed run needs."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": asdict(state),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def restore_training_state(
    saved: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> LoopState:
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return LoopState(**saved["loop"])


def with_timeout(batches: Iterable[Batch], seconds: float, message: str) -> Iterator[Batch]:
    """``batches`` read ahead by a helper thread; ``TimeoutError(message)`` when the next one
    takes longer than ``seconds`` (a stalled input pipeline fails instead of hanging the run)."""
    from scbert_platform.data.loader import prefetch

    return prefetch(iter(batches), 2, timeout_s=seconds, timeout_message=message)
