"""Input embeddings: expression token embedding plus gene identity embedding (gene2vec).

The gene2vec matrix is passed in as a tensor (the loaders below read the two published formats);
constructors never read files.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scbert.config import ScBertConfig


class GeneEmbedding(nn.Module):
    """Gene identity vector for each position, (n_genes + 1, dim), added to the token embedding.

    ``gene2vec``: a fixed buffer (not trained), the panel's rows plus a zero row for the appended
    position, as in the paper. ``learned``: a trained table (deviation from the paper, for panels
    without gene2vec vectors). ``none``: zeros (published checkpoints trained with pos_embed=False).
    """

    weight: torch.Tensor  # (n_genes + 1, dim) buffer, unless learned

    def __init__(self, *, config: ScBertConfig, gene2vec: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = config.gene_embedding
        self.learned: nn.Embedding | None = None
        rows = config.seq_len
        if self.kind == "gene2vec":
            if gene2vec is None:
                raise ValueError(
                    "config.gene_embedding='gene2vec' needs the matrix: pass gene2vec= "
                    "(see load_gene2vec_npy / load_gene2vec_text) or use gene_embedding='learned'"
                )
            if gene2vec.shape not in ((config.n_genes, config.dim), (rows, config.dim)):
                raise ValueError(
                    f"gene2vec has shape {tuple(gene2vec.shape)}; expected "
                    f"({config.n_genes}, {config.dim}) or ({rows}, {config.dim})"
                )
            table = gene2vec.detach().to(torch.float32)
            if table.shape[0] == config.n_genes:
                table = torch.cat([table, table.new_zeros(1, config.dim)])
            self.register_buffer("weight", table.clone())
        elif self.kind == "learned":
            self.learned = nn.Embedding(rows, config.dim)
        else:  # nothing to save: the zeros are rebuilt from the config
            self.register_buffer("weight", torch.zeros(rows, config.dim), persistent=False)

    def forward(self) -> torch.Tensor:
        """The table, (n_genes + 1, dim); broadcast over cells by the caller."""
        if self.learned is not None:
            return self.learned.weight
        return self.weight


def load_gene2vec_npy(path: str | Path, *, n_genes: int | None = None) -> torch.Tensor:
    """Read a gene2vec matrix saved as ``.npy`` in panel order (published ``gene2vec_16906.npy``).

    Returns float32 (n_genes, dim). ``n_genes`` checks the row count against the panel.
    """
    matrix = np.load(Path(path), allow_pickle=False)
    if matrix.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D (n_genes, dim) matrix, got shape {matrix.shape}")
    if n_genes is not None and matrix.shape[0] != n_genes:
        raise ValueError(f"{path}: {matrix.shape[0]} rows but the panel has {n_genes} genes")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{path}: gene2vec matrix contains NaN or inf")
    return torch.from_numpy(matrix.astype(np.float32))


def read_gene2vec_text(path: str | Path) -> dict[str, np.ndarray]:
    """Read the Gene2vec text format: one gene per line, its symbol then its floats.

    A word2vec header line (``<n_genes> <dim>``) is skipped when present.
    """
    vectors: dict[str, np.ndarray] = {}
    dim: int | None = None
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            values = np.asarray(parts[1:], dtype=np.float32)
            if dim is None:
                dim = values.size
            if values.size != dim or dim == 0:
                raise ValueError(f"{path}:{line_no}: {values.size} values, expected {dim}")
            vectors[parts[0]] = values
    if not vectors:
        raise ValueError(f"{path}: no gene vectors found")
    return vectors


def load_gene2vec_text(
    path: str | Path, panel: Sequence[str], *, min_coverage: float = 0.9
) -> torch.Tensor:
    """Gene2vec text file aligned to ``panel`` by exact symbol: float32 (len(panel), dim).

    Panel genes without a vector get a zero row (with a warning); if fewer than ``min_coverage``
    of the panel have vectors it is an error naming the missing genes.
    """
    vectors = read_gene2vec_text(path)
    dim = next(iter(vectors.values())).size
    missing = [gene for gene in panel if gene not in vectors]
    coverage = 1 - len(missing) / max(len(panel), 1)
    if coverage < min_coverage:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"{path}: only {len(panel) - len(missing)}/{len(panel)} panel genes ({coverage:.1%}) "
            f"have a gene2vec vector, below min_coverage={min_coverage:.0%}; missing: {shown}"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} panel genes have no gene2vec vector and get zeros "
            f"(first: {', '.join(missing[:5])})",
            stacklevel=2,
        )
    zero = np.zeros(dim, dtype=np.float32)
    return torch.from_numpy(np.stack([vectors.get(gene, zero) for gene in panel]))
