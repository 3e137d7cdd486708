"""Loader throughput: cells/s delivered as dense binned (b, n_genes + 1) tensors.

Three ways over the same cells (synthetic by default: 16,906 genes as in the paper's panel):
- our loader in a single process (``iter_local_batches``: pyarrow -> CellBatcher -> torch);
- our Ray Data pipeline with 2 CPUs (``cell_dataset(...).iter_torch_batches``);
- anndata's ``AnnLoader`` over a backed .h5ad of the same normalised values, binned per batch, in
  file order and shuffled (training shuffles: our loader does it by file order + a local buffer).

Targets (issue 3): >= 20,000 cells/s here and >= 5x AnnLoader. Synthetic data measures speed
only; it is never reported as accuracy.

    python bench/loader_speed.py                        # 20,000 synthetic cells
    python bench/loader_speed.py --shards data/cells/x  # an ingested directory
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scbert.tokens import bin_values
from scbert_platform.ingest import ingest
from scbert_platform.loader import ShardInfo, cell_dataset, iter_local_batches
from scbert_platform.params import DataParams


def timed(batches: Iterable[Any], count: Callable[[Any], int]) -> tuple[float, int]:
    """(cells/s, cells) over an iterable of batches, the first batch excluded (warm-up)."""
    iterator = iter(batches)
    next(iterator)
    cells, start = 0, time.perf_counter()
    for batch in iterator:
        cells += count(batch)
    return cells / (time.perf_counter() - start), cells


def make_shards(n_cells: int, n_genes: int, workdir: Path) -> Path:
    from scbert_platform.synthetic import write_synthetic_h5ad

    source = workdir / "synthetic.h5ad"
    print(f"writing {n_cells} synthetic cells x {n_genes} genes ...", file=sys.stderr)
    write_synthetic_h5ad(source, n_cells, n_genes, progress=False)
    out = workdir / "cells"
    params = DataParams(label_key="cell_type", panel_min_cells=1, min_genes=200)
    ingest(source, out, params, executor="local", log=lambda _: None)
    return out


def shards_as_h5ad(shards: Path, path: Path, max_cells: int) -> Path:
    """The shards' normalised values as a CSR .h5ad (what an AnnLoader user would hold)."""
    import anndata
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from scbert_platform.loader import shard_files, values_matrix

    info = ShardInfo.read(shards)
    parts, n = [], 0
    for file in shard_files(shards):
        parts.append(
            values_matrix(pq.read_table(file, columns=["gene_idx", "value"]), info.n_genes)
        )
        n += parts[-1].shape[0]
        if n >= max_cells:
            break
    matrix = sp.vstack(parts).tocsr()[:max_cells]
    anndata.AnnData(matrix).write_h5ad(path)
    return path


def bench_annloader(
    h5ad: Path, n_bins: int, batch_size: int, *, shuffle: bool, sparse_binning: bool
) -> tuple[float, int]:
    """AnnLoader over a backed .h5ad. Default: its own converter (a dense float tensor per batch)
    then binning in torch; ``sparse_binning``: our binning on the sparse rows instead."""
    import anndata
    from anndata.experimental import AnnLoader

    adata = anndata.read_h5ad(h5ad, backed="r")

    def sparse_binned(x: Any) -> torch.Tensor:
        return torch.as_tensor(bin_values(x, n_bins, dtype=np.uint8))

    def tokens(batch: Any) -> torch.Tensor:
        x = batch.X if sparse_binning else batch.X.clamp(max=n_bins).to(torch.uint8)
        return torch.nn.functional.pad(x, (0, 1))

    convert = {"X": sparse_binned} if sparse_binning else None
    loader = AnnLoader(adata, batch_size=batch_size, shuffle=shuffle, convert=convert)
    return timed((tokens(batch) for batch in loader), lambda batch: batch.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", help="an ingested shard directory (default: synthetic)")
    parser.add_argument("--cells", type=int, default=20_000, help="synthetic cells")
    parser.add_argument("--genes", type=int, default=16_906, help="synthetic genes")
    parser.add_argument("--n-bins", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--annloader-cells", type=int, default=5_000)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory(prefix="scbert-loader-bench-") as tmp:
        workdir = Path(tmp)
        shards = Path(args.shards) if args.shards else make_shards(args.cells, args.genes, workdir)
        info = ShardInfo.read(shards)
        print(f"{info.n_cells} cells x {info.n_genes} genes from {shards}", file=sys.stderr)
        rows = []

        local = iter_local_batches(shards, args.n_bins, batch_size=args.batch_size)
        speed, n = timed(
            (torch.from_numpy(b["tokens"]) for b in local), lambda batch: batch.shape[0]
        )
        rows.append(("our loader, 1 process", speed, n))
        print(f"{rows[-1][0]}: {speed:,.0f} cells/s", file=sys.stderr)

        import ray

        from scbert_platform.cluster import start_ray

        start_ray(num_cpus=2)
        try:
            dataset = cell_dataset(shards, args.n_bins)
            batches = dataset.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=4)
            speed, n = timed(batches, lambda batch: batch["tokens"].shape[0])
            rows.append(("our Ray Data pipeline, 2 CPUs", speed, n))
            print(f"{rows[-1][0]}: {speed:,.0f} cells/s", file=sys.stderr)
        finally:
            ray.shutdown()

        h5ad = shards_as_h5ad(shards, workdir / "values.h5ad", args.annloader_cells)
        for shuffle in (False, True):
            for sparse_binning in (False, True):
                speed, n = bench_annloader(
                    h5ad,
                    args.n_bins,
                    args.batch_size,
                    shuffle=shuffle,
                    sparse_binning=sparse_binning,
                )
                how = "our sparse binning" if sparse_binning else "dense + torch binning"
                name = f"AnnLoader shuffle={shuffle}, {how}"
                rows.append((name, speed, n))
                print(f"{name}: {speed:,.0f} cells/s", file=sys.stderr)

    annloader = rows[-2][1]  # shuffled (as training reads), AnnLoader's own converter
    print(f"dense binned (b, {info.n_genes + 1}) uint8 tensors, batch {args.batch_size}:")
    print(f"{'':48}{'cells/s':>10}{'cells':>9}{'vs shuffled AnnLoader':>23}")
    for name, speed, n in rows:
        print(f"{name:48}{speed:>10,.0f}{n:>9}{speed / annloader:>22.1f}x")


if __name__ == "__main__":
    main()
