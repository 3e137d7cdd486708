"""A gene panel of the N most variable genes of an .h5ad of raw counts (scanpy's ``seurat``
flavour on log1p of counts normalised to 1e4), one symbol per line, for ``scbert ingest --panel``.

The recipe study uses it for Zeisel (4,000 genes): scBERT's cost grows with the panel, and
1,000 genes keep a 5-fold CV within this machine's budget. The baselines in the same
``scbert cv`` run see the same panel, so the comparison stays on equal input.

    python bench/quality/hvg_panel.py data/raw/zeisel.h5ad --top 1000 --out data/zeisel_hvg1000.txt
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    import anndata
    import scanpy as sc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("h5ad")
    ap.add_argument("--top", type=int, default=1000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    adata = anndata.read_h5ad(args.h5ad)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=args.top, flavor="seurat")
    genes = adata.var_names[adata.var["highly_variable"]].tolist()
    with open(args.out, "w") as out:
        out.writelines(f"{gene}\n" for gene in genes)
    print(f"wrote {len(genes)} genes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
