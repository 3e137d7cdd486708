"""Loader throughput: cells/s delivered as dense binned (b, n_genes + 1) tensors.

Side by side in one run, over the same cells (synthetic by default: 16,906 genes as in the
paper's panel):
- our loader in a single process (``iter_local_batches``: pyarrow -> CellBatcher -> torch);
- our Ray Data pipeline with 2 CPUs as training reads it: sparse binned rows through the object
  store, densified by the consumer (``cell_dataset`` + ``dense_batches``), in block order and
  with the training shuffle buffer;
- the Ray Data pipeline it replaced (dense uint8 blocks through the object store,
  ``iter_torch_batches``; Ray's own local shuffle buffer for the shuffled row), rebuilt here;
- anndata's ``AnnLoader`` over a backed .h5ad of the same normalised values, binned per batch, in
  file order and shuffled (training shuffles: our loader does it by file order + a local buffer).
Each Ray Data row runs two passes over the cells: the first includes starting Ray Data's
workers, the second is the steady state a multi-epoch run sees.

Targets (issue 17): Ray Data >= 50,000 cells/s and >= 5x shuffled AnnLoader. Synthetic data
measures speed only; it is never reported as accuracy.

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
from scbert_platform.data.ingest import ingest
from scbert_platform.data.loader import (
    CellBatcher,
    ShardInfo,
    cell_dataset,
    dense_batches,
    iter_local_batches,
    shard_files,
)
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
    from scbert_platform.data.synthetic import write_synthetic_h5ad

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

    from scbert_platform.data.loader import shard_files, values_matrix

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
    parser.add_argument(
        "--shuffle-buffer", type=int, default=4096, help="cells (data.shuffle_buffer's default)"
    )
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
        rows.append(("our loader, 1 process", speed, n, None))
        print(f"{rows[-1][0]}: {speed:,.0f} cells/s", file=sys.stderr)

        import ray

        from scbert_platform.cluster import start_ray

        start_ray(num_cpus=2)
        try:
            for name, make in ray_arms(shards, info, args).items():
                speeds = [timed(make(), lambda batch: batch["tokens"].shape[0]) for _ in range(2)]
                rows.append((name, speeds[1][0], speeds[1][1], speeds[0][0]))
                print(
                    f"{name}: {speeds[0][0]:,.0f} then {speeds[1][0]:,.0f} cells/s", file=sys.stderr
                )
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
                rows.append((name, speed, n, None))
                print(f"{name}: {speed:,.0f} cells/s", file=sys.stderr)

    annloader = rows[-2][1]  # shuffled (as training reads), AnnLoader's own converter
    print(f"dense binned (b, {info.n_genes + 1}) uint8 tensors, batch {args.batch_size}:")
    print(f"{'':58}{'cells/s':>10}{'1st pass':>10}{'cells':>9}{'vs shuffled AnnLoader':>23}")
    for name, speed, n, first in rows:
        first_pass = f"{first:,.0f}" if first else "-"
        print(f"{name:58}{speed:>10,.0f}{first_pass:>10}{n:>9}{speed / annloader:>22.1f}x")


def ray_arms(
    shards: Path, info: ShardInfo, args: argparse.Namespace
) -> dict[str, Callable[[], Any]]:
    """The Ray Data rows: a fresh pipeline per pass (each pass reads every cell once)."""
    batch, buffer = args.batch_size, args.shuffle_buffer

    def sparse(shuffle: int) -> Callable[[], Any]:
        return lambda: dense_batches(
            cell_dataset(shards, args.n_bins),
            info.n_genes,
            batch_size=batch,
            shuffle_buffer=shuffle,
            seed=0,
        )

    def dense_blocks(shuffle: int) -> Callable[[], Any]:
        return lambda: dense_block_pipeline(shards, info, args.n_bins).iter_torch_batches(
            batch_size=batch,
            prefetch_batches=4,
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=0,
        )

    return {
        "Ray Data, sparse rows (now), block order": sparse(0),
        f"Ray Data, sparse rows (now), shuffle buffer {buffer}": sparse(buffer),
        "Ray Data, dense blocks (before), block order": dense_blocks(0),
        f"Ray Data, dense blocks (before), shuffle buffer {buffer}": dense_blocks(buffer),
    }


def dense_block_pipeline(shards: Path, info: ShardInfo, n_bins: int) -> Any:
    """The pipeline before issue 17: dense uint8 blocks of 2,048 cells through the object store."""
    import ray.data

    batcher = CellBatcher(info.n_genes, n_bins, info.labels)
    return (
        ray.data.read_parquet(shard_files(shards), shuffle="files")
        .select_columns(["gene_idx", "value", "label"])
        .map_batches(batcher, batch_format="pyarrow", batch_size=2048)
    )


if __name__ == "__main__":
    main()
