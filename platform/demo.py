"""The main job's model step: scBERT at paper size (parameter count, one forward pass), then the
same architecture on real ingested cells (the pipeline's shards, e.g. ``data/cells/pbmc68k``)."""

from __future__ import annotations

import argparse
import time

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
    parser.add_argument("--cells-dir", help="ingested shards: also run on their first cells")
    parser.add_argument("--gene2vec", help="Gene2vec text file for the shards' panel")
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
    if args.cells_dir:
        run_on_shards(args.cells_dir, args.gene2vec, n_cells=args.cells)


def run_on_shards(directory: str, gene2vec_path: str | None, *, n_cells: int) -> None:
    """The paper's architecture over an ingested dataset's own panel, on its first real cells."""
    from scbert import load_gene2vec_text
    from scbert_platform.loader import ShardInfo, iter_local_batches

    info = ShardInfo.read(directory)
    gene2vec = load_gene2vec_text(gene2vec_path, info.panel) if gene2vec_path else None
    config = ScBertConfig(
        n_genes=info.n_genes,
        n_classes=len(info.labels),
        gene_embedding="gene2vec" if gene2vec is not None else "learned",
    )
    torch.manual_seed(0)
    model = ScBert(config=config, gene2vec=gene2vec).eval()
    batch = next(iter_local_batches(directory, config.n_bins, batch_size=n_cells))
    tokens = torch.from_numpy(batch["tokens"])
    with torch.inference_mode():
        logits = model(tokens)
    labels = [info.labels[i] for i in batch["label"]]
    print(
        f"real cells from {directory}: {info.n_cells} cells, panel of {info.n_genes} genes, "
        f"{len(info.labels)} labels, gene embedding {config.gene_embedding}"
    )
    print(
        f"tokens {tuple(tokens.shape)} ({tokens.dtype}) -> logits {tuple(logits.shape)}; "
        f"labels of these cells: {labels}"
    )


if __name__ == "__main__":
    main()
