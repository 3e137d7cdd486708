"""Synthetic scRNA-seq raw counts with planted cell types, for scale and fault tests.

Never real data: every object records ``uns['synthetic']['synthetic'] = True`` and its parameters.

The model, per gene g and cell c of type t:

- baseline means ``mu_g`` are log-normal, then scaled so that a cell expresses about
  ``mean_genes_per_cell`` genes (``P(count > 0)`` under the negative binomial, summed over genes),
  at most half the panel: a matrix where every gene is expressed has no structure left;
- each type has a module of ``module_size`` marker genes (disjoint across types), whose means are
  multiplied by ``fold_change`` in cells of that type: ``var['module']`` holds the type index of a
  marker gene and -1 for the others, so the modules double as planted co-expression modules;
- a per-cell library size factor ``s_c`` (log-normal, mean 1);
- ``count ~ NB(mean = s_c * mu_g * fold, dispersion)``, drawn as Gamma-Poisson.

Cells are generated in fixed blocks of ``BLOCK_CELLS``, each from its own generator seeded by
``SeedSequence(seed, spawn_key=(1, block))``; the shared parameters come from ``spawn_key=(0,)``.
So ``make_synthetic`` and ``write_synthetic_h5ad`` give identical rows for the same arguments,
whatever ``chunk_cells`` the writer uses. Each random quantity of a block has its own stream,
drawn in row order, so asking for fewer cells gives the first rows of a larger request.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from scbert.atomic import atomic_file

# cells drawn from one generator; fixed so that the output does not depend on chunk sizes
BLOCK_CELLS = 1_000


@dataclass(frozen=True)
class SyntheticSpec:
    """All knobs of the generator; stored in ``uns['synthetic']``."""

    n_cells: int
    n_genes: int
    n_types: int = 8
    seed: int = 0
    mean_genes_per_cell: float = 1500.0
    module_size: int | None = None  # None: min(50, n_genes // (2 * n_types))
    fold_change: float = 8.0
    dispersion: float = 0.3  # NB: variance = mean + dispersion * mean^2
    library_sigma: float = 0.4  # sd of log library size factor
    gene_sigma: float = 1.5  # sd of log baseline mean

    def __post_init__(self) -> None:
        if self.n_cells < 1 or self.n_genes < 1 or self.n_types < 1:
            raise ValueError(
                f"n_cells, n_genes and n_types must be >= 1, got {self.n_cells}, "
                f"{self.n_genes}, {self.n_types}"
            )
        if self.fold_change <= 0 or self.dispersion <= 0 or self.mean_genes_per_cell <= 0:
            raise ValueError("fold_change, dispersion and mean_genes_per_cell must be > 0")
        if self.module_size is not None and self.module_size < 0:
            raise ValueError(f"module_size must be >= 0, got {self.module_size}")
        if self.n_types * self.resolved_module_size > self.n_genes:
            raise ValueError(
                f"{self.n_types} types x {self.resolved_module_size} marker genes do not fit in "
                f"{self.n_genes} genes"
            )

    @property
    def resolved_module_size(self) -> int:
        if self.module_size is not None:
            return self.module_size
        return max(1, min(50, self.n_genes // (2 * self.n_types)))

    @property
    def target_genes_per_cell(self) -> float:
        # at most half the genes: a matrix where every gene is expressed has no structure left
        return min(self.mean_genes_per_cell, 0.5 * self.n_genes)


@dataclass(frozen=True)
class _Shared:
    """Parameters shared by all cells (drawn once from the seed)."""

    means: np.ndarray  # (n_genes,) baseline NB means for a library factor of 1
    module: np.ndarray  # (n_genes,) type index of marker genes, -1 otherwise
    type_probs: np.ndarray  # (n_types,)


def _expected_expressed(means: np.ndarray, dispersion: float) -> float:
    """Expected number of non-zero genes per cell: sum of P(NB > 0) = 1 - (1 + d*mu)^(-1/d)."""
    return float(np.sum(1.0 - np.power(1.0 + dispersion * means, -1.0 / dispersion)))


def _shared_params(spec: SyntheticSpec) -> _Shared:
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,)))
    raw = rng.lognormal(0.0, spec.gene_sigma, size=spec.n_genes)
    low, high = -30.0, 30.0  # bisection on the log of the scale factor
    for _ in range(80):
        mid = 0.5 * (low + high)
        if _expected_expressed(raw * np.exp(mid), spec.dispersion) < spec.target_genes_per_cell:
            low = mid
        else:
            high = mid
    means = raw * np.exp(0.5 * (low + high))
    size = spec.resolved_module_size
    markers = rng.permutation(spec.n_genes)[: spec.n_types * size]
    module = np.full(spec.n_genes, -1, dtype=np.int64)
    module[markers] = np.repeat(np.arange(spec.n_types), size)
    # uneven but not degenerate type proportions
    type_probs = rng.dirichlet(np.full(spec.n_types, 5.0))
    return _Shared(means=means, module=module, type_probs=type_probs)


def _block(
    spec: SyntheticSpec, shared: _Shared, index: int, dtype: Any
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts (cells, n_genes) CSR and type indices of block ``index``."""
    n = min(BLOCK_CELLS, spec.n_cells - index * BLOCK_CELLS)
    # one stream per quantity, each filled in row order: a shorter block is a prefix of a full one
    streams = np.random.SeedSequence(spec.seed, spawn_key=(1, index)).spawn(4)
    type_rng, library_rng, gamma_rng, poisson_rng = (np.random.default_rng(s) for s in streams)
    types = type_rng.choice(spec.n_types, size=n, p=shared.type_probs)
    sigma = spec.library_sigma
    library = library_rng.lognormal(-0.5 * sigma**2, sigma, size=n)  # mean 1
    mean = library[:, None] * shared.means[None, :]  # (n, n_genes)
    boosted = shared.module[None, :] == types[:, None]  # marker genes of the cell's own type
    mean[boosted] *= spec.fold_change
    shape = 1.0 / spec.dispersion
    rate = gamma_rng.standard_gamma(shape, size=mean.shape)
    rate *= mean / shape  # Gamma(shape, scale=mean/shape): mean `mean`, Poisson on top -> NB
    counts = poisson_rng.poisson(rate)
    return sp.csr_matrix(counts.astype(dtype)), types


def _iter_blocks(
    spec: SyntheticSpec, shared: _Shared, dtype: Any
) -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
    for index in range(-(-spec.n_cells // BLOCK_CELLS)):
        yield _block(spec, shared, index, dtype)


def _obs(spec: SyntheticSpec, types: np.ndarray) -> pd.DataFrame:
    width = max(6, len(str(spec.n_cells)))
    names = [f"cell_{i + 1:0{width}d}" for i in range(spec.n_cells)]
    categories = [f"type_{t}" for t in range(spec.n_types)]
    labels = pd.Categorical.from_codes(types, categories=categories)
    return pd.DataFrame({"cell_type": labels}, index=pd.Index(names))


def _var(spec: SyntheticSpec, shared: _Shared) -> pd.DataFrame:
    width = max(5, len(str(spec.n_genes)))
    names = [f"GENE{i + 1:0{width}d}" for i in range(spec.n_genes)]
    return pd.DataFrame({"module": shared.module, "base_mean": shared.means}, index=pd.Index(names))


def _uns(spec: SyntheticSpec) -> dict[str, Any]:
    params = {k: v for k, v in asdict(spec).items() if v is not None}
    params["module_size"] = spec.resolved_module_size
    return {
        "synthetic": {
            "synthetic": True,
            "generator": "scbert_platform.data.synthetic",
            "note": "simulated negative-binomial counts with planted cell types; not real data",
            "block_cells": BLOCK_CELLS,
            **params,
        }
    }


def make_synthetic(
    n_cells: int,
    n_genes: int,
    *,
    n_types: int = 8,
    seed: int = 0,
    mean_genes_per_cell: float = 1500.0,
    module_size: int | None = None,
    fold_change: float = 8.0,
    dispersion: float = 0.3,
    dtype: Any = np.float32,
) -> ad.AnnData:
    """Synthetic raw counts in memory: CSR ``X`` (integer values in ``dtype``),
    ``obs['cell_type']`` ("type_0", ...), ``var['module']`` (marker module, -1 for none),
    ``uns['synthetic']`` (the parameters). Same seed, same output."""
    spec = SyntheticSpec(
        n_cells, n_genes, n_types, seed, mean_genes_per_cell, module_size, fold_change, dispersion
    )
    shared = _shared_params(spec)
    blocks = list(_iter_blocks(spec, shared, dtype))
    matrix = sp.vstack([b for b, _ in blocks], format="csr")
    types = np.concatenate([t for _, t in blocks])
    return ad.AnnData(X=matrix, obs=_obs(spec, types), var=_var(spec, shared), uns=_uns(spec))


def _create_csr_group(group: h5py.Group, n_genes: int, dtype: Any) -> None:
    """An empty on-disk CSR matrix in the AnnData encoding, grown by ``_append_rows``."""
    group.attrs["encoding-type"] = "csr_matrix"
    group.attrs["encoding-version"] = "0.1.0"
    group.attrs["shape"] = (0, n_genes)
    chunks = (1 << 18,)
    group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=chunks)
    group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=chunks)
    # int64 row pointers: 100k cells x 1500 genes is already 1.5e8 entries
    group.create_dataset("indptr", data=np.zeros(1, dtype=np.int64), maxshape=(None,))


def _append_rows(group: h5py.Group, block: sp.csr_matrix) -> None:
    n_rows, n_genes = (int(x) for x in group.attrs["shape"])
    nnz = group["data"].shape[0]
    for name, values in (("data", block.data), ("indices", block.indices)):
        group[name].resize((nnz + values.size,))
        group[name][nnz:] = values
    indptr = group["indptr"]
    indptr.resize((n_rows + block.shape[0] + 1,))
    indptr[n_rows + 1 :] = block.indptr[1:].astype(np.int64) + nnz
    group.attrs["shape"] = (n_rows + block.shape[0], n_genes)


def _write_h5ad_streaming(
    handle: h5py.File, spec: SyntheticSpec, chunk_cells: int, dtype: Any, progress: bool
) -> None:
    handle.attrs["encoding-type"] = "anndata"
    handle.attrs["encoding-version"] = "0.1.0"
    shared = _shared_params(spec)
    _create_csr_group(handle.create_group("X"), spec.n_genes, dtype)
    pending: list[sp.csr_matrix] = []
    types: list[np.ndarray] = []
    done, start = 0, time.perf_counter()
    for block, block_types in _iter_blocks(spec, shared, dtype):
        pending.append(block)
        types.append(block_types)
        n_pending = sum(b.shape[0] for b in pending)
        if n_pending >= chunk_cells or done + n_pending == spec.n_cells:
            _append_rows(handle["X"], sp.vstack(pending, format="csr"))
            done += n_pending
            pending = []
            if progress:
                elapsed = time.perf_counter() - start
                print(
                    f"synthetic: {done:,}/{spec.n_cells:,} cells written ({elapsed:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    write_elem(handle, "obs", _obs(spec, np.concatenate(types)))
    write_elem(handle, "var", _var(spec, shared))
    write_elem(handle, "uns", _uns(spec))
    for name in ("obsm", "varm", "obsp", "varp", "layers"):
        write_elem(handle, name, {})


def write_synthetic_h5ad(
    path: str | Path,
    n_cells: int,
    n_genes: int,
    *,
    chunk_cells: int = 10_000,
    n_types: int = 8,
    seed: int = 0,
    mean_genes_per_cell: float = 1500.0,
    module_size: int | None = None,
    fold_change: float = 8.0,
    dispersion: float = 0.3,
    dtype: Any = np.float32,
    progress: bool = True,
) -> Path:
    """Write what ``make_synthetic`` returns for the same arguments to ``path`` (.h5ad), appending
    ``chunk_cells`` rows at a time so memory stays bounded; atomic (temp file + rename).

    Readable with ``anndata.read_h5ad(path, backed='r')``. Progress lines go to stderr.
    """
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be >= 1, got {chunk_cells}")
    spec = SyntheticSpec(
        n_cells, n_genes, n_types, seed, mean_genes_per_cell, module_size, fold_change, dispersion
    )
    path = Path(path)
    with atomic_file(path) as staging, h5py.File(staging, "w-") as handle:
        _write_h5ad_streaming(handle, spec, chunk_cells, dtype, progress)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m scbert_platform.data.synthetic OUT.h5ad --cells N --genes G --types T``."""
    parser = argparse.ArgumentParser(
        prog="python -m scbert_platform.data.synthetic",
        description="Write synthetic raw counts with planted cell types (not real data) to .h5ad.",
    )
    parser.add_argument("out", type=Path, help="output .h5ad path")
    parser.add_argument("--cells", type=int, default=10_000, help="number of cells")
    parser.add_argument("--genes", type=int, default=16_906, help="number of genes")
    parser.add_argument("--types", type=int, default=8, help="number of cell types")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genes-per-cell", type=float, default=1500.0, help="mean expressed")
    parser.add_argument("--chunk-cells", type=int, default=10_000, help="rows per append")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        write_synthetic_h5ad(
            args.out,
            args.cells,
            args.genes,
            chunk_cells=args.chunk_cells,
            n_types=args.types,
            seed=args.seed,
            mean_genes_per_cell=args.genes_per_cell,
            progress=not args.quiet,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.cells:,} cells x {args.genes:,} genes, synthetic)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
