"""Offline annotation at scale: `scbert annotate` on a synthetic .h5ad, in memory, backed (read
chunk by chunk from disk) and on Ray Data workers; wall time, cells/s and the peak resident
memory of the process (and of its Ray workers, for the distributed run).

    python bench/annotate_scale.py --cells 20000 --genes 2000

The counts are synthetic (scbert_platform.data.synthetic) and the model has random weights over the
synthetic genes, laptop-sized (dim 64, depth 2): the figures are throughput and memory, never
accuracy. Each run is a fresh `scbert annotate` process, which reports its own peak RSS
(getrusage); the Ray Data workers of the distributed run are other processes, not counted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def build_model(directory: Path, genes: list[str], n_types: int) -> None:
    import torch

    from scbert import ScBert, ScBertConfig, save_pretrained

    config = ScBertConfig(
        n_genes=len(genes), n_classes=n_types, dim=64, depth=2, heads=4, dim_head=16,
        gene_embedding="learned",
    )  # fmt: skip
    torch.manual_seed(0)
    save_pretrained(
        ScBert(config=config).eval(),
        directory,
        panel=genes,
        classes=[f"type{i}" for i in range(n_types)],
    )


# runs the CLI and, on exit, prints the process's own peak RSS (KiB) to stderr
WRAPPER = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
    " file=sys.stderr))\n"
    "runpy.run_module('scbert_platform.cli', run_name='__main__')\n"
)


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one `scbert` process (Ray workers not included)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"scbert {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")]
    return wall, int(peak[-1]) / 1024**2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--genes-per-cell", type=float, default=400.0)
    parser.add_argument("--workdir", default="bench/data/annotate")
    parser.add_argument("--workers", type=int, default=2, help="Ray Data workers (distributed)")
    args = parser.parse_args()

    import anndata

    from scbert_platform.data.synthetic import write_synthetic_h5ad

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"synthetic-{args.cells}x{args.genes}.h5ad"
    if not data.is_file():
        write_synthetic_h5ad(
            data, args.cells, args.genes, mean_genes_per_cell=args.genes_per_cell, progress=False
        )
    backed = anndata.read_h5ad(data, backed="r")
    genes, n_types = list(backed.var_names), int(backed.obs["cell_type"].nunique())
    backed.file.close()
    model = work / "model"
    build_model(model, genes, n_types)
    size_gib = data.stat().st_size / 1024**3
    print(f"{data} ({size_gib:.2f} GiB on disk, {args.cells:,} cells x {args.genes:,} genes)")
    print("| run | wall s | cells/s | peak RSS of the scbert process, GiB |")
    print("|---|---:|---:|---:|")
    common = [str(data), "-m", str(model), "--quiet"]
    runs = {
        "backed, 1024-cell chunks": ["--backed", "-o", str(work / "backed.h5ad")],
        "in memory": ["--no-backed", "-o", str(work / "memory.h5ad")],
        f"backed, Ray Data, {args.workers} workers": [
            "--backed", "--distributed", "--workers", str(args.workers),
            "-o", str(work / "distributed.h5ad"),
        ],
    }  # fmt: skip
    for name, extra in runs.items():
        wall, peak = run(["annotate", *common, *extra])
        print(f"| {name} | {wall:.1f} | {args.cells / wall:,.0f} | {peak:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
