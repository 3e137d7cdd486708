"""A fast screen of fine-tuning recipes: the 5 folds of an ingested shard set, in one process.

Not the platform's path (``scbert cv`` runs each fold on Ray Train, tracked in MLflow): this
screen uses the same model, tokens, losses and folds without Ray, so that one recipe costs
minutes instead of tens of minutes on 2 CPUs, and ``scbert cv`` then confirms the winners
(bench/quality/dvc.yaml). Like ``scbert cv``: each fold in turn is the test set; a seeded 10%
of the other cells is the validation split that chooses the checkpoint (the test fold never
chooses anything); macro F1 and accuracy are mean ± std over the folds.

    python bench/quality/screen.py data/cells/pbmc68k --gene2vec data/gene2vec/pbmc68k.txt \
        --steps 600 --loss ce --head-activation leaky_relu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from scbert import ScBert, ScBertConfig, load_gene2vec_text
from scbert.tokens import tokenize
from scbert_platform.data.loader import ShardInfo
from scbert_platform.train.loop import ClassLoss, class_weights, fit_temperature
from scbert_platform.train.metrics import expected_calibration_error
from scbert_tune.baselines import load_cells

SUMMARY = (  # the per-fold figures summarised as mean ± std
    "accuracy",
    "macro_f1",
    "ece_uncalibrated",
    "ece",
    "last_accuracy",
    "last_macro_f1",
    "swa_accuracy",
    "swa_macro_f1",
    "tau0.5_accuracy",
    "tau0.5_macro_f1",
    "tau1.0_accuracy",
    "tau1.0_macro_f1",
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards")
    ap.add_argument("--gene2vec", default="", help="a Gene2vec text file; none: learned")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--loss", default="ce", choices=["ce", "focal", "ldam_drw"])
    ap.add_argument("--class-weights", action="store_true")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--head-activation", default="leaky_relu", choices=["relu", "leaky_relu"])
    ap.add_argument("--n-bins", type=int, default=5)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--head-dropout", type=float, default=0.0)
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--swa-from", type=int, default=150, help="average the weights validated from this step"
    )
    ap.add_argument(
        "--same-seed", action="store_true", help="every fold from --seed (as scbert cv does)"
    )
    ap.add_argument("--threads", type=int, default=1)
    # probes of where the gap to logreg comes from (bench/RESULTS.md, ninth session)
    ap.add_argument(
        "--head-input",
        default="encoder",
        choices=["encoder", "detected", "plus-tokens", "gated-tokens"],
        help="the head's per-gene scalar: the encoder's (published); zero for undetected genes; "
        "the encoder's plus the gene's token read as a number; the same with the encoder's "
        "scalar times a learned gate that starts at 0",
    )
    ap.add_argument(
        "--encoder-lr", type=float, default=1.0, help="the embeddings' and encoder's lr, x --lr"
    )
    ap.add_argument(
        "--ordinal-init",
        type=float,
        default=0.0,
        help="start the bin tokens on a line (this much apart along one direction, which the "
        "head's per-gene weights start on), so that the head first reads the bins as numbers",
    )
    ap.add_argument("--json", help="write the per-fold results here")
    return ap.parse_args(argv)


class DetectedOnlyHead(torch.nn.Module):
    """scBERT's head with the per-gene scalar set to zero where the gene is not detected
    (``--head-input detected``; ``plus-tokens`` is the model's own ``cls_token_input``)."""

    def __init__(self, model: ScBert) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.model.head
        x = head.gene_act(head.per_gene(self.model.encode(tokens))).squeeze(-1) * (tokens > 0)
        x = head.dropout(head.act(head.fc1(x)))
        return head.fc3(head.dropout(head.act(head.fc2(x))))


def train_fold(args: argparse.Namespace, data: dict[str, Any], fold: int) -> dict[str, Any]:
    y, folds, tokens, labels = data["y"], data["folds"], data["tokens"], data["labels"]
    seed = args.seed if args.same_seed else args.seed + fold
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    outer = np.flatnonzero((folds != fold) & (y >= 0))
    is_val = rng.random(len(outer)) < 0.1
    train, val, test = outer[~is_val], outer[is_val], np.flatnonzero((folds == fold) & (y >= 0))
    counts = {label: int((y[train] == i).sum()) for i, label in enumerate(labels)}
    config = ScBertConfig(
        n_genes=tokens.shape[1] - 1,
        n_bins=args.n_bins,
        dim=args.dim,
        depth=args.depth,
        heads=4,
        dim_head=16,
        n_classes=len(labels),
        cls_activation=args.head_activation,
        cls_dropout=args.head_dropout,
        cls_token_input=args.head_input in ("plus-tokens", "gated-tokens"),
        cls_encoder_gate=args.head_input == "gated-tokens",
        gene_embedding="gene2vec" if data["gene2vec"] is not None else "learned",
    )
    model = ScBert(config=config, gene2vec=data["gene2vec"])
    if args.ordinal_init:
        with torch.no_grad():
            direction = torch.randn(args.dim)
            direction /= direction.norm()
            bins = torch.arange(args.n_bins + 1, dtype=torch.float32) - args.n_bins / 2
            shift = args.ordinal_init * bins[:, None] * direction
            model.token_emb.weight[: args.n_bins + 1] += shift
            model.head.per_gene.weight.copy_(direction * model.head.per_gene.weight.norm())
    forward = DetectedOnlyHead(model) if args.head_input == "detected" else model
    loss = ClassLoss(
        kind=args.loss,
        class_weight=class_weights(counts, labels) if args.class_weights else None,
        label_smoothing=args.label_smoothing,
        counts=torch.tensor([counts[label] for label in labels], dtype=torch.float32),
        total_steps=args.steps,
    )
    head = [p for n, p in model.named_parameters() if n.startswith(("head.", "norm."))]
    body = [p for n, p in model.named_parameters() if not n.startswith(("head.", "norm."))]
    optimizer = torch.optim.Adam(
        [{"params": head}, {"params": body, "lr": args.lr * args.encoder_lr}], lr=args.lr
    )

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + np.cos(np.pi * step / args.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    @torch.no_grad()
    def logits_of(index: np.ndarray) -> np.ndarray:
        model.eval()
        out = [forward(tokens[index[i : i + 64]]) for i in range(0, len(index), 64)]
        model.train()
        return torch.cat(out).numpy()

    best: tuple[float, dict[str, torch.Tensor] | None, int] = (-1.0, None, 0)
    snapshots: list[dict[str, torch.Tensor]] = []  # validated weights from --swa-from on
    for step in range(args.steps):
        batch = rng.choice(train, args.batch_size, replace=False)
        value = loss(forward(tokens[batch]), torch.as_tensor(y[batch]), step)
        optimizer.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            score = f1_score(y[val], logits_of(val).argmax(1), average="macro")
            if step + 1 >= args.swa_from:
                snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            if score > best[0]:
                best = (score, {k: v.clone() for k, v in model.state_dict().items()}, step + 1)
    assert best[1] is not None
    last = logits_of(test).argmax(1)  # the last step's model, for comparison with the kept one
    model.load_state_dict(
        {
            k: torch.stack([s[k] for s in snapshots]).mean(0) if v.is_floating_point() else v
            for k, v in snapshots[-1].items()
        }
    )
    swa = logits_of(test).argmax(1)  # stochastic weight averaging of the validated snapshots
    model.load_state_dict(best[1])
    t = fit_temperature(logits_of(val), y[val])
    z = logits_of(test)
    before = torch.softmax(torch.as_tensor(z), 1).numpy()
    after = torch.softmax(torch.as_tensor(z) / t, 1).numpy()
    predicted = z.argmax(1)
    log_prior = np.log(np.array([max(counts[label], 1) for label in labels]) / len(train))
    adjusted = {  # post-hoc logit adjustment (Menon et al. 2021): argmax of z - tau * log prior
        f"tau{tau}": (z - tau * log_prior).argmax(1) for tau in (0.5, 1.0)
    }
    return {
        **{
            f"{key}_{name}": fn(y[test], pred)
            for key, pred in adjusted.items()
            for name, fn in (
                ("accuracy", accuracy_score),
                ("macro_f1", lambda t, p: f1_score(t, p, average="macro")),
            )
        },
        "fold": fold,
        "accuracy": accuracy_score(y[test], predicted),
        "macro_f1": f1_score(y[test], predicted, average="macro"),
        "val_macro_f1": best[0],
        "best_step": best[2],
        "classes_predicted": len(set(predicted.tolist())),
        "last_accuracy": accuracy_score(y[test], last),
        "last_macro_f1": f1_score(y[test], last, average="macro"),
        "swa_accuracy": accuracy_score(y[test], swa),
        "swa_macro_f1": f1_score(y[test], swa, average="macro"),
        "ece_uncalibrated": expected_calibration_error(before, y[test]),
        "ece": expected_calibration_error(after, y[test]),
        "temperature": t,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    x, y, folds, labels = load_cells(args.shards)
    info = ShardInfo.read(args.shards)
    data = {
        "y": y,
        "folds": folds,
        "labels": labels,
        "tokens": tokenize(x.toarray(), args.n_bins),
        "gene2vec": load_gene2vec_text(args.gene2vec, info.panel) if args.gene2vec else None,
    }
    started, results = time.time(), []
    for fold in (int(f) for f in args.folds.split(",")):
        results.append(train_fold(args, data, fold))
        print(json.dumps(results[-1]), f"{time.time() - started:.0f} s", file=sys.stderr)
    summary = {"args": vars(args), "folds": results}
    for key in SUMMARY:
        values = np.array([r[key] for r in results])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    line = " | ".join(
        f"{k} {summary[k + '_mean']:.3f} ± {summary[k + '_std']:.3f}"
        for k in SUMMARY
        if k != "ece_uncalibrated"
    )
    print(f"{' '.join(argv or sys.argv[1:])} | {line} | {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
