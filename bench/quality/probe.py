"""Where scBERT's gap to logistic regression comes from: the same folds, the same tokens, and
models between the two.

On an ingested shard set's 5 folds (each fold in turn the test set, as ``scbert cv`` runs them):

- ``logreg``: the platform's baseline (scikit-learn, C=1) on the shards' values, log2(1 + x) of
  counts normalised to 1e4, as ``scbert cv --baseline logreg`` runs it;
- ``logreg-bins``: the same on scBERT's input, the ``--n-bins`` expression tokens read as numbers
  (does binning lose what logreg uses?);
- ``logreg-onehot``: the same on the tokens one-hot (one weight per gene and bin, as an embedding
  table gives each token its own vector);
- ``head``: scBERT's classification head without the Performer in front, the MLP
  (genes -> 512 -> 128 -> classes, ReLU) on the tokens read as numbers, trained as the recipe
  trains scBERT (Adam, lr 2e-3, 10 warm-up steps then one cosine, gradient norm clipped at 1,
  batches of 16). It leaves out a seeded 10% of the training cells, as the recipe leaves out its
  validation split, and keeps the last step's weights, so it chooses nothing; one row per seed.
  Screens of its training, named in the rows: ``--class-weights`` (the recipe's
  ``train.class_weights``), ``--weight-decay`` (AdamW), ``--dropout``, ``--label-smoothing``,
  ``--linear`` (a linear path from the tokens to the logits beside the MLP); ``--only-head``
  leaves out logreg's rows.

    python bench/quality/probe.py data/cells/zeisel47 --steps 1200 --seeds 0,1,2

Prints a markdown table (mean ± std over the folds); ``--json`` writes the per-fold figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from scbert.tokens import bin_values
from scbert_platform.train.loop import class_weights
from scbert_tune.baselines import _estimator, load_cells


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards")
    ap.add_argument("--n-bins", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300, help="the head's training steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", default="0", help="the head's seeds, comma-separated")
    ap.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW's (0: Adam, as the recipe)"
    )
    ap.add_argument("--dropout", type=float, default=0.0, help="after each hidden layer")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--class-weights", action="store_true", help="inverse frequency, mean 1")
    ap.add_argument("--linear", action="store_true", help="add a linear path tokens -> logits")
    ap.add_argument("--only-head", action="store_true", help="skip the logreg rows")
    ap.add_argument("--json", help="write the per-fold figures here")
    return ap.parse_args(argv)


def scores(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "macro_f1": float(f1_score(y, predicted, average="macro")),
    }


def logreg(features: Any, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> Any:
    """The platform's logreg baseline (``scbert cv --baseline logreg``) on ``features``."""
    return _estimator("logreg", 0).fit(features[train], y[train]).predict(features[test])


class WithLinear(torch.nn.Module):
    def __init__(self, mlp: torch.nn.Module, linear: torch.nn.Module) -> None:
        super().__init__()
        self.mlp, self.linear = mlp, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.linear(x)


def head(
    args: argparse.Namespace, tokens: torch.Tensor, y: np.ndarray, train: np.ndarray, seed: int
) -> torch.nn.Module:
    """scBERT's head (its MLP sizes and activations) trained on the tokens as numbers."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = int(y.max()) + 1
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(tokens.shape[1], 512),
        torch.nn.ReLU(),
        torch.nn.Dropout(args.dropout),
        torch.nn.Linear(512, 128),
        torch.nn.ReLU(),
        torch.nn.Dropout(args.dropout),
        torch.nn.Linear(128, n_classes),
    )
    if args.linear:
        model = WithLinear(model, torch.nn.Linear(tokens.shape[1], n_classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps)),
    )
    labels = torch.as_tensor(y)
    weight = None
    if args.class_weights:  # the recipe's train.class_weights
        counts = np.bincount(y[train], minlength=n_classes)
        weight = class_weights(
            {str(k): int(n) for k, n in enumerate(counts)}, list(map(str, range(n_classes)))
        )
    for _ in range(args.steps):
        batch = rng.choice(train, args.batch_size, replace=False)
        loss = torch.nn.functional.cross_entropy(
            model(tokens[batch]), labels[batch], weight=weight, label_smoothing=args.label_smoothing
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model.eval()


def variant(args: argparse.Namespace) -> str:
    """The head's options that differ from the recipe's, for its rows' names."""
    named = [
        ("cw", args.class_weights),
        (f"wd{args.weight_decay:g}", args.weight_decay),
        (f"drop{args.dropout:g}", args.dropout),
        (f"ls{args.label_smoothing:g}", args.label_smoothing),
        ("linear", args.linear),
    ]
    return "".join(f"-{name}" for name, on in named if on)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    x, y, folds, _ = load_cells(args.shards)
    values = x.toarray()
    binned = bin_values(values, args.n_bins).astype(np.float32)
    onehot = np.concatenate(
        [binned == b for b in range(1, args.n_bins + 1)], axis=1, dtype=np.float32
    )
    tokens = torch.as_tensor(binned)
    seeds = [int(s) for s in args.seeds.split(",")]
    started, rows = time.time(), []
    for fold in sorted(set(folds[y >= 0].tolist())):
        outer = np.flatnonzero((folds != fold) & (y >= 0))
        test = np.flatnonzero((folds == fold) & (y >= 0))
        found = (
            {}
            if args.only_head
            else {
                "logreg": logreg(x, y, outer, test),  # sparse, as the baseline reads the shards
                f"logreg-bins{args.n_bins}": logreg(binned, y, outer, test),
                f"logreg-onehot{args.n_bins}": logreg(onehot, y, outer, test),
            }
        )
        for seed in seeds:
            rng = np.random.default_rng(seed + fold)
            train = outer[rng.random(len(outer)) >= 0.1]  # a validation split's worth left out
            model = head(args, tokens, y, train, seed)
            with torch.no_grad():
                found[f"head-{args.steps}{variant(args)}-seed{seed}"] = (
                    model(tokens[test]).argmax(1).numpy()
                )
        for arm, predicted in found.items():
            rows.append({"fold": int(fold), "arm": arm, **scores(y[test], predicted)})
        print(f"fold {fold} done, {time.time() - started:.0f} s", file=sys.stderr)
    print(f"{args.shards}: {len(rows) // len(found)} folds\n")
    print("| arm | accuracy | macro F1 |\n| --- | ---: | ---: |")
    for arm in found:
        got = [r for r in rows if r["arm"] == arm]
        cells = [
            f"{np.mean([r[k] for r in got]):.3f} ± {np.std([r[k] for r in got], ddof=1):.3f}"
            for k in ("accuracy", "macro_f1")
        ]
        print(f"| {arm} | {cells[0]} | {cells[1]} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "folds": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
