"""Gene vectors learned from co-expression in ingested shards (a stand-in for gene2vec).

The published gene2vec matrix (Du et al. 2019) cannot be downloaded, so we learn gene vectors
from the user's own cells with the count-based equivalent of word2vec (Levy & Goldberg 2014/2015):
a cell is a "context window" and two genes co-occur when both are expressed in the same cell.

1. Stream the Parquet shards of ``scbert ingest`` batch by batch (bounded memory) and accumulate
   the co-occurrence matrix ``C = sum over batches of X_bᵀ X_b`` (n_genes x n_genes, float32),
   where ``X_b`` is the batch's cells x genes matrix holding 1 for an expressed gene (``binary``)
   or its ``value`` = log2(1 + normalised count) (``value``). The diagonal (a gene with itself)
   is dropped. Genes expressed in fewer than ``min_cells`` cells are dropped (rows and columns
   zeroed) and get a zero vector, with a warning.
2. Positive pointwise mutual information with context-distribution smoothing (Levy et al. 2015):
   ``PPMI(i, j) = max(0, log(p(i, j) / (p(i) p_α(j))))`` with ``p(i, j) = C_ij / T``,
   ``p(i) = sum_j C_ij / T``, ``p_α(j) = (sum_i C_ij)^α / sum_k (sum_i C_ik)^α`` and
   ``T = sum_ij C_ij``; ``alpha = 1`` is plain PPMI.
3. Truncated SVD ``PPMI ≈ U S Vᵀ`` to ``dim`` components (randomized SVD with power iterations,
   Halko et al. 2011; exact SVD for small panels) and gene vectors ``U sqrt(S)`` (the symmetric
   weighting of Levy et al. 2015). Column signs are fixed (largest entry positive) so the
   result does not depend on the SVD routine. Panels with ``n_genes <= dim`` are padded with
   zero columns, with a warning.

The accumulation and the SVD run in torch, on CUDA when available: the product costs
``cells x n_genes²`` flops (about 3e13 for 100k cells on the 16,906-gene panel). Counts are
accumulated in float32, exact for binary weights up to 2^24 (16.7 M) cells.
Memory: one dense (n_genes, n_genes) float32 matrix (1.1 GB at 16,906 genes) plus one batch.

Output: the Gene2vec text format (symbol then ``dim`` floats per line, panel order, no header),
read by ``scbert.embedding.load_gene2vec_text``. See docs/gene_embed.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from scbert.atomic import atomic_file
from scbert_platform.data.loader import SHARD_GLOB, check_shards
from scbert_platform.data.manifest import read_manifest
from scbert_platform.params import (
    WEIGHTINGS,
    GeneEmbedParams,
    ModelParams,
    Params,
    add_params_arguments,
)

Weighting = Literal["binary", "value"]  # params.WEIGHTINGS
MODEL, GENE_EMBED = ModelParams(), GeneEmbedParams()  # the defaults: model.dim, gene_embed


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"gene_embed: {message}", file=sys.stderr, flush=True)


def read_panel(shards_dir: str | Path) -> list[str]:
    """Panel genes in order from ``shards_dir/panel.txt`` (one symbol per line)."""
    path = Path(shards_dir) / "panel.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the shards directory must hold the panel written by scbert ingest"
        )
    genes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    genes = [gene for gene in genes if gene]
    if not genes:
        raise ValueError(f"{path} lists no genes")
    if len(set(genes)) != len(genes):
        raise ValueError(f"{path} lists duplicate genes")
    return genes


def shard_paths(shards_dir: str | Path) -> list[Path]:
    """The ``part-*.parquet`` shards of ``shards_dir``, in order; errors when there are none."""
    directory = Path(shards_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"shards directory {directory} does not exist")
    paths = sorted(directory.glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(
            f"no Parquet shards ({SHARD_GLOB}) in {directory}: run scbert ingest first"
        )
    return paths


def _check_manifest(shards_dir: Path, n_genes: int) -> None:
    """panel.txt is the source of truth; a manifest that disagrees on the size is an error, and
    the shards it lists must be whole and unchanged (``check_shards``)."""
    path = shards_dir / "manifest.json"
    if not path.is_file():
        return
    manifest = read_manifest(shards_dir)
    check_shards(shards_dir, manifest)
    panel = manifest.get("panel", {})
    expected = panel.get("n_genes") if isinstance(panel, dict) else None
    if expected is not None and int(expected) != n_genes:
        raise ValueError(
            f"{path} says the panel has {expected} genes but panel.txt lists {n_genes}"
        )


def _iter_batches(
    path: Path, n_genes: int, weighting: Weighting, batch_cells: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(indptr, gene indices, weights) of each record batch of one shard: a CSR cells x genes."""
    columns = ["gene_idx", "value"] if weighting == "value" else ["gene_idx"]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_cells, columns=columns):
        genes = batch.column("gene_idx")
        lengths = pc.fill_null(pc.list_value_length(genes), 0).to_numpy()
        indptr = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        indices = pc.list_flatten(genes).to_numpy(zero_copy_only=False).astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
            raise ValueError(
                f"{path}: gene index {int(indices.max())} outside the {n_genes}-gene panel "
                "(panel.txt does not match the shards)"
            )
        if weighting == "value":
            weights = pc.list_flatten(batch.column("value")).to_numpy(zero_copy_only=False)
            if weights.size != indices.size:
                raise ValueError(f"{path}: gene_idx and value lists differ in length")
            weights = weights.astype(np.float32)
        else:
            weights = np.ones(indices.size, dtype=np.float32)
        yield indptr, indices, weights


def _densify(
    indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, n_genes: int
) -> np.ndarray:
    dense = np.zeros((indptr.size - 1, n_genes), dtype=np.float32)  # (cells, n_genes)
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    dense[rows, indices] = weights
    return dense


def cooccurrence(
    paths: Sequence[Path],
    n_genes: int,
    *,
    weighting: Weighting = "binary",
    batch_cells: int = 1_024,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, np.ndarray]:
    """``sum over cells of x xᵀ`` (n_genes, n_genes) float32 on ``device``, and the number of
    cells expressing each gene (n_genes,)."""
    cooc = torch.zeros(n_genes, n_genes, dtype=torch.float32, device=device)
    n_expressing = np.zeros(n_genes, dtype=np.int64)
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    done, start = 0, time.perf_counter()
    last_log = start

    def report(number: int, path: Path) -> float:
        now = time.perf_counter()
        where = f"shard {number}/{len(paths)} {path.name}"
        _log(f"{where}: {done:,}/{total:,} cells ({now - start:.1f} s)", progress)
        return now

    for number, path in enumerate(paths, start=1):
        for indptr, indices, weights in _iter_batches(path, n_genes, weighting, batch_cells):
            n_expressing += np.bincount(indices, minlength=n_genes)
            chunk = torch.from_numpy(_densify(indptr, indices, weights, n_genes)).to(device)
            cooc.addmm_(chunk.T, chunk)  # C += X_bᵀ X_b, (n_genes, n_genes)
            done += indptr.size - 1
            if time.perf_counter() - last_log > 10:  # long shards: a line every 10 s
                last_log = report(number, path)
        last_log = report(number, path)
    if done == 0:
        raise ValueError(f"the shards in {paths[0].parent} hold no cells")
    return cooc, n_expressing


def ppmi_(cooc: torch.Tensor, *, alpha: float = 0.75) -> torch.Tensor:
    """Positive PMI of a co-occurrence matrix, in place (see the module docstring)."""
    cooc.fill_diagonal_(0)
    rows = cooc.sum(dim=1).double()  # (summing in float64 could copy the whole matrix)
    contexts = cooc.sum(dim=0).double().pow(alpha)
    p_context = contexts / contexts.sum()
    # zero marginals belong to all-zero rows/columns; 1 keeps log(0) - log(1) = -inf -> 0, not NaN
    log_rows = torch.where(rows > 0, rows, 1.0).log().to(cooc.dtype)
    log_contexts = torch.where(p_context > 0, p_context, 1.0).log().to(cooc.dtype)
    cooc.log_()  # log C_ij; -inf where genes never co-occur
    cooc.sub_(log_rows[:, None]).sub_(log_contexts[None, :])  # log C_ij / (r_i p_α(j))
    return cooc.clamp_(min=0)


def _fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Each column's largest-magnitude entry made positive (SVD signs are arbitrary)."""
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(u.shape[1], device=u.device)])
    return u * torch.where(signs == 0, 1.0, signs)


def truncated_svd(
    matrix: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_iter: int = 6,
    oversample: int = 16,
    exact_up_to: int = 2_048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` left singular vectors (n, k) and values (k,) of a square matrix.

    Randomized range finder with power iterations (Halko et al. 2011, alg. 4.4); exact SVD when
    the matrix has at most ``exact_up_to`` rows.
    """
    n = matrix.shape[0]
    width = min(n, k + oversample)
    if n <= exact_up_to or width >= n:
        u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u[:, :k].to(matrix.dtype), s[:k].to(matrix.dtype)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=generator).to(matrix.device, matrix.dtype)
    q, _ = torch.linalg.qr(matrix @ omega)  # (n, width)
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ q)
    u_small, s, _ = torch.linalg.svd((q.T @ matrix).double(), full_matrices=False)
    return (q @ u_small[:, :k].to(matrix.dtype)), s[:k].to(matrix.dtype)


def _warn_dropped(genes: Sequence[str], n_expressing: np.ndarray, min_cells: int) -> None:
    never = np.flatnonzero(n_expressing == 0)
    rare = np.flatnonzero((n_expressing > 0) & (n_expressing < min_cells))
    if never.size:
        warnings.warn(
            f"{never.size} panel genes are never expressed in the shards and get zero vectors "
            f"(first: {', '.join(genes[i] for i in never[:5])})",
            stacklevel=3,
        )
    if rare.size:
        warnings.warn(
            f"{rare.size} panel genes are expressed in fewer than min_cells={min_cells} cells "
            f"and get zero vectors (first: {', '.join(genes[i] for i in rare[:5])})",
            stacklevel=3,
        )


def learn_gene_embeddings(
    shards_dir: str | Path,
    *,
    dim: int = MODEL.dim,
    min_cells: int = GENE_EMBED.min_cells,
    alpha: float = GENE_EMBED.alpha,
    weighting: str = GENE_EMBED.weighting,
    seed: int = GENE_EMBED.seed,
    batch_cells: int = GENE_EMBED.batch_cells,
    device: str | None = None,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Gene vectors from co-expression in ``scbert ingest`` shards: (panel genes, float32
    (n_genes, dim)) in ``panel.txt`` order. Method in the module docstring. The options are the
    ``gene_embed`` params section's (and ``dim`` is ``model.dim``), checked there: a bad one is
    a ``ParamsError`` (a ValueError) naming it.

    ``device`` None picks CUDA when available. Progress lines go to stderr.
    """
    ModelParams(dim=dim)
    GeneEmbedParams(
        min_cells=min_cells, alpha=alpha, weighting=weighting, seed=seed, batch_cells=batch_cells
    )
    directory = Path(shards_dir)
    paths = shard_paths(directory)
    genes = read_panel(directory)
    _check_manifest(directory, len(genes))
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _log(f"{len(paths)} shards, {len(genes):,} genes, dim {dim}, on {target}", progress)
    cooc, n_expressing = cooccurrence(
        paths,
        len(genes),
        weighting=cast(Weighting, weighting),
        batch_cells=batch_cells,
        device=target,
        progress=progress,
    )
    _warn_dropped(genes, n_expressing, min_cells)
    start = time.perf_counter()
    out = embed_cooccurrence(cooc, n_expressing >= min_cells, dim=dim, alpha=alpha, seed=seed)
    _log(f"PPMI + SVD: {time.perf_counter() - start:.1f} s", progress)
    return genes, out


def embed_cooccurrence(
    cooc: torch.Tensor, keep: np.ndarray, *, dim: int, alpha: float = 0.75, seed: int = 0
) -> np.ndarray:
    """Vectors ``U sqrt(S)`` of the PPMI of ``cooc`` (overwritten), float32 (n_genes, dim);
    genes not in the boolean mask ``keep`` are left out and get zeros."""
    n_genes = cooc.shape[0]
    if not keep.any():
        raise ValueError("no gene is expressed in enough cells (min_cells) to learn a vector")
    dropped = torch.from_numpy(~keep).to(cooc.device)
    cooc[dropped] = 0  # neither a gene nor a context
    cooc[:, dropped] = 0
    matrix = ppmi_(cooc, alpha=alpha)
    k = min(dim, n_genes)
    u, s = truncated_svd(matrix, k, seed=seed)
    vectors = _fix_signs(u) * s.clamp(min=0).sqrt()[None, :]  # (n_genes, k)
    vectors[dropped] = 0
    out = np.zeros((n_genes, dim), dtype=np.float32)
    out[:, :k] = vectors.cpu().numpy()
    if k < dim:
        warnings.warn(
            f"the panel has {n_genes} genes, fewer than dim={dim}: columns {k}..{dim - 1} are zero",
            stacklevel=3,
        )
    return out


def write_gene2vec_text(path: str | Path, genes: Sequence[str], vectors: np.ndarray) -> Path:
    """Write the Gene2vec text format (symbol then floats, one gene per line, no header),
    atomically. ``%.9g`` keeps float32 values exact."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(genes) or matrix.shape[1] == 0:
        raise ValueError(f"vectors of shape {matrix.shape} do not match {len(genes)} genes")
    if not np.isfinite(matrix).all():
        raise ValueError("vectors contain NaN or inf")
    bad = [gene for gene in genes if not gene or any(c.isspace() for c in gene)]
    if bad:
        raise ValueError(f"gene symbols must be non-empty without whitespace: {bad[:5]}")
    if len(set(genes)) != len(genes):
        raise ValueError("gene symbols must be unique")
    path = Path(path)
    with atomic_file(path) as staging, open(staging, "x", encoding="utf-8") as handle:
        for gene, row in zip(genes, matrix, strict=True):
            handle.write(gene + " " + " ".join(map("{:.9g}".format, row.tolist())) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m scbert_platform.data.gene_embed SHARDS_DIR --out gene2vec.txt``: the options
    from ``params.yaml`` (``model.dim``, the ``gene_embed`` section), ``--set`` and the flags."""
    parser = argparse.ArgumentParser(
        prog="python -m scbert_platform.data.gene_embed",
        description="Learn gene2vec-style vectors from co-expression in ingested Parquet shards.",
    )
    parser.add_argument("shards_dir", type=Path, help="directory written by scbert ingest")
    parser.add_argument("--out", type=Path, required=True, help="Gene2vec text file to write")
    parser.add_argument("--dim", type=int, help="vector width (model.dim)")
    parser.add_argument(
        "--min-cells", type=int, help="rarer genes get zero vectors (gene_embed.min_cells)"
    )
    parser.add_argument("--alpha", type=float, help="context smoothing, 1 = off (gene_embed.alpha)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, help="(gene_embed.weighting)")
    parser.add_argument("--seed", type=int, help="(gene_embed.seed)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    flags = {
        "model.dim": args.dim,
        "gene_embed.min_cells": args.min_cells,
        "gene_embed.alpha": args.alpha,
        "gene_embed.weighting": args.weighting,
        "gene_embed.seed": args.seed,
    }
    try:
        params = Params.load(args.params, args.overrides).replace(
            {key: value for key, value in flags.items() if value is not None}
        )
        settings = params.gene_embed
        genes, vectors = learn_gene_embeddings(
            args.shards_dir,
            dim=params.model.dim,
            min_cells=settings.min_cells,
            alpha=settings.alpha,
            weighting=settings.weighting,
            seed=settings.seed,
            batch_cells=settings.batch_cells,
            device=args.device,
            progress=not args.quiet,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_gene2vec_text(args.out, genes, vectors)
    zero = int((~vectors.any(axis=1)).sum())
    print(f"wrote {args.out}: {len(genes):,} genes x {params.model.dim} ({zero:,} zero vectors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
