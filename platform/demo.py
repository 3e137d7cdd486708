"""The main job's last step: scBERT at paper size (parameter count, one forward pass), the
pipeline's fine-tuned model annotating real test-fold cells (``data/cells/pbmc68k``), then the
sweep and cross-validation tables, and the CV run registered and promoted past the gate."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scbert import ScBert, ScBertConfig, tokenize
from scbert.runtime import keep_freed_memory

PAPER_N_GENES = 16_906  # the published gene panel


def build_paper_model(*, n_classes: int | None, seed: int = 0) -> ScBert:
    """scBERT with the paper's sizes and a random stand-in for the (unpublished) gene2vec matrix."""
    generator = torch.Generator().manual_seed(seed)
    config = ScBertConfig(n_genes=PAPER_N_GENES, n_classes=n_classes)
    gene2vec = torch.randn(config.n_genes, config.dim, generator=generator)
    torch.manual_seed(seed)
    return ScBert(config=config, gene2vec=gene2vec)


def random_cells(n_cells: int, n_genes: int, *, seed: int = 0) -> torch.Tensor:
    """log2(1 + x)-like values, ~10% of genes expressed (as in PBMC data), tokenised."""
    generator = torch.Generator().manual_seed(seed)
    expressed = torch.rand(n_cells, n_genes, generator=generator) < 0.1
    values = torch.log2(1 + torch.rand(n_cells, n_genes, generator=generator) * 60) * expressed
    return tokenize(values, n_bins=5)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, of which in the encoder)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    return trainable, encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=2, help="cells in the forward pass")
    parser.add_argument("--classes", type=int, default=10, help="cell types of the classifier head")
    parser.add_argument("--cells-dir", help="ingested shards: also annotate their test-fold cells")
    parser.add_argument("--model", help="a fine-tuned checkpoint directory for --cells-dir")
    parser.add_argument("--sweep-report", help="the sweep stage's table (reports/sweep.md)")
    parser.add_argument(
        "--cv-report", help="the cv stage's summary (reports/cv.json): registered and promoted"
    )
    args = parser.parse_args(argv)
    keep_freed_memory()  # large intermediates reused, not re-faulted (docs/model.md)

    model = build_paper_model(n_classes=args.classes).eval()
    trainable, encoder = count_parameters(model)
    c = model.config
    print(
        f"scBERT at paper size: n_genes={c.n_genes} (+1 appended), n_bins={c.n_bins}, dim={c.dim}, "
        f"depth={c.depth}, heads={c.heads}, dim_head={c.dim_head}, nb_features={c.nb_features}"
    )
    print(f"trainable parameters: {trainable:,} (encoder {encoder:,}; paper: about 5.0 M encoder)")
    tokens = random_cells(args.cells, c.n_genes)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens)
        proba = logits.softmax(dim=-1)
    elapsed = time.perf_counter() - start
    print(f"input tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)} in {elapsed:.1f} s")
    print(f"max class probability per cell (random weights): {proba.max(dim=1).values.tolist()}")
    if args.cells_dir and args.model:
        run_on_shards(args.cells_dir, args.model, n_cells=max(args.cells, 8))
    if args.sweep_report:
        print(f"\nsweep (reports/sweep.md):\n{Path(args.sweep_report).read_text()}")
    if args.cv_report:
        register_and_promote(Path(args.cv_report))


def run_on_shards(directory: str, model_dir: str, *, n_cells: int, fold: int = 0) -> None:
    """The pipeline's fine-tuned model on real cells of the test fold (never used to train it or
    to choose its checkpoint): predicted against expert cell types."""
    from scbert import assign_cell_types, load_pretrained
    from scbert_platform.loader import ShardInfo, iter_local_batches

    info = ShardInfo.read(directory)
    bundle = load_pretrained(model_dir)
    assert bundle.labels is not None, f"{model_dir} is not a fine-tuned checkpoint"
    model = bundle.model.eval()
    tokens, labels = [], []
    for batch in iter_local_batches(directory, model.config.n_bins, folds=[fold], batch_size=64):
        tokens.append(torch.from_numpy(batch["tokens"]))
        labels += batch["label"].tolist()
        if len(labels) >= n_cells:
            break
    with torch.inference_mode():
        proba = model.predict_proba(torch.cat(tokens)[:n_cells])
    predicted = assign_cell_types(proba, bundle.labels, threshold=0.5)
    truth = [info.labels[i] for i in labels[:n_cells]]
    c = model.config
    print(
        f"fine-tuned model {model_dir} (dim {c.dim}, depth {c.depth}, {c.n_genes} genes) on "
        f"{len(truth)} real cells of test fold {fold} from {directory}:"
    )
    for true, guess, p in zip(truth, predicted, proba.max(dim=1).values.tolist(), strict=True):
        print(f"  {'ok ' if true == guess else 'x  '}{true:30} -> {guess} ({p:.2f})")


def register_and_promote(cv_report: Path) -> None:
    """Register the CV run's model (once per run) and promote it if it passes the gate; a
    refusal is reported, not an error: the gate doing its job is part of the demo."""
    from scbert_platform.tracking import tracking_uri
    from scbert_tune.registry import CHAMPION, GateRefused, promote, register, registry_client

    summary = json.loads(cv_report.read_text())
    markdown = cv_report.with_suffix(".md")
    if markdown.is_file():
        print(f"\n5-fold cross-validation on real cells ({markdown}):\n{markdown.read_text()}")
    run_id = summary["mlflow_run_id"]
    client = registry_client()
    existing = client.search_model_versions(f"run_id = '{run_id}'")
    if existing:
        name, version = existing[0].name, existing[0].version
        print(f"CV run {run_id} is already {name} version {version}")
    else:
        move = register(run_id)
        name, version = move.name, move.version
        print(f"registered CV run {run_id} as {name} version {version} (alias challenger)")
    try:
        move = promote(name)
        print(f"promoted: {name} version {move.version} is the {CHAMPION} ({move.reason})")
    except GateRefused as refused:
        print(f"not promoted (the gate refused): {refused}")
    champion = client.get_model_version_by_alias(name, CHAMPION)
    print(
        f"{name}@{CHAMPION} = version {champion.version}, cv/macro_f1 "
        f"{float(champion.tags.get('metric.cv/macro_f1', 'nan')):.3f}; browse it with: "
        f"mlflow ui --backend-store-uri {tracking_uri()}"
    )


if __name__ == "__main__":
    main()
