"""Which genes scBERT attends to, per cell type (paper Fig. 5a and 5c).

For every cell the model computes the attention each gene receives: the column sums of the
attention matrix averaged over heads and layers, in O(n) memory (``ScBert.attention_sums``; the
Performer never forms the n x n matrix). ``explain`` averages them over the cells of each group
(true labels, or the predicted types) and ranks the genes:

- ``rank_by="attention"`` (the paper's): the highest mean attention in the type;
- ``rank_by="specificity"``: the highest attention relative to the other types (the type's mean
  minus the mean over types, in units of the spread over types), which surfaces markers rather
  than the genes every cell attends to.

Outputs (``write_explanation``): ``top_genes.csv`` (type, rank, gene, attention, specificity,
fraction of the type's cells expressing it, z-scored mean expression), ``top_genes.gmt`` and one
``genes_<type>.txt`` per type (for Enrichr, g:Profiler, GSEA), ``attention_heatmap.png`` (types x
top genes, Fig. 5a) and ``expression_dotplot.png`` (z-scored expression of the top genes by
type, dot size = fraction expressing, Fig. 5c).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scbert_platform.infer.annotation import (
    CELL_TYPE,
    AnnotationError,
    chunk_ranges,
    chunk_tokens,
    expression_input,
    row_reader,
)
from scbert_platform.infer.models import LoadedModel
from scbert_platform.params import ExplainParams, ParamsError

EXPLAIN = ExplainParams()  # explain's defaults: the explain params section


@dataclass
class Explanation:
    """Per group: mean attention and expression statistics over the panel genes, and the top
    genes. ``attention``, ``expression`` (z-scored mean of log2(1 + normalised counts)) and
    ``fraction`` (share of cells expressing) are DataFrames groups x panel genes."""

    groupby: str
    rank_by: str
    attention: Any
    expression: Any
    fraction: Any
    n_cells: dict[str, int]
    top: Any  # DataFrame: cell_type, rank, gene, attention, specificity, fraction, expression_z

    def genes(self) -> dict[str, list[str]]:
        """The top genes of each group, in rank order."""
        return {g: list(t["gene"]) for g, t in self.top.groupby("cell_type", sort=False)}


def explain(
    adata: Any,
    model: Any,
    *,
    groupby: str | None = None,
    top_n: int = EXPLAIN.top_n,
    rank_by: str = EXPLAIN.rank_by,
    min_cells: int = EXPLAIN.min_cells,
    batch_size: int = EXPLAIN.batch_size,
    device: str = "auto",
    layer: str | None = None,
    use_raw: bool | None = None,
    input: str = "auto",
    gene_id_column: str | None = None,
    chunk_cells: int = EXPLAIN.chunk_cells,
    progress: bool = True,
) -> Explanation:
    """Attention per gene averaged by group (``groupby``: an obs column; default the predicted
    types of ``annotate``), and each group's ``top_n`` genes. Groups with fewer than
    ``min_cells`` cells are left out (their means are noise)."""
    try:  # the explain params section checks the options
        ExplainParams(
            top_n=top_n,
            rank_by=rank_by,
            min_cells=min_cells,
            batch_size=batch_size,
            chunk_cells=chunk_cells,
        )
    except ParamsError as err:
        raise AnnotationError(str(err)) from None
    groupby = groupby or CELL_TYPE
    codes, names = _group_codes(adata, groupby)
    loaded = LoadedModel.load(model, device=device, fine_tuned=False)
    found, matrix = expression_input(
        adata, layer=layer, use_raw=use_raw, input=input, gene_id_column=gene_id_column
    )
    sums = _sum_by_group(
        loaded,
        found,
        matrix,
        codes,
        len(names),
        batch_size=batch_size,
        chunk_cells=chunk_cells,
        progress=progress,
    )
    return _explanation(
        sums,
        codes,
        names,
        loaded.panel,
        n=found.n_cells,
        groupby=groupby,
        min_cells=min_cells,
        top_n=top_n,
        rank_by=rank_by,
    )


def _group_codes(adata: Any, groupby: str) -> tuple[np.ndarray, Any]:
    """Each cell's group number (-1: no group) and the group names, sorted."""
    import pandas as pd

    if groupby not in adata.obs:
        hint = " (run annotate first, or name a label column)" if groupby == CELL_TYPE else ""
        raise AnnotationError(
            f"no obs column {groupby!r} to group cells by{hint}; columns: {list(adata.obs.columns)}"
        )
    groups = adata.obs[groupby]
    return pd.factorize(groups.astype(str).where(groups.notna()), sort=True)


@dataclass
class _GroupSums:
    """Sums over each group's cells (groups x panel genes: attention received, expression,
    cells expressing) and over all cells (panel genes: expression and its square)."""

    attention: np.ndarray
    expression: np.ndarray
    expressed: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def zeros(cls, n_groups: int, n_panel: int) -> _GroupSums:
        by_group = [np.zeros((n_groups, n_panel)) for _ in range(3)]
        return cls(*by_group, np.zeros(n_panel), np.zeros(n_panel))

    def add(self, chunk_codes: np.ndarray, sums: np.ndarray, dense: np.ndarray) -> None:
        """A chunk of cells: their group numbers, attention sums and expression values."""
        self.total += dense.sum(axis=0)
        self.total_sq += (dense**2).sum(axis=0)
        keep = chunk_codes >= 0
        onehot = np.zeros((len(self.attention), len(dense)))
        onehot[chunk_codes[keep], np.flatnonzero(keep)] = 1.0
        self.attention += onehot @ sums
        self.expression += onehot @ dense
        self.expressed += onehot @ (dense > 0)


def _sum_by_group(
    loaded: LoadedModel,
    found: Any,
    matrix: Any,
    codes: np.ndarray,
    n_groups: int,
    *,
    batch_size: int,
    chunk_cells: int,
    progress: bool,
) -> _GroupSums:
    """The attention each panel gene receives and its expression, summed by group, reading the
    cells ``chunk_cells`` at a time and running the model ``batch_size`` cells at a time."""
    import torch

    from scbert_platform.console import progress as progress_bar

    panel = loaded.panel
    positions = panel.positions(list(found.genes))
    n_panel = len(panel)
    sums = _GroupSums.zeros(n_groups, n_panel)
    net = loaded.model
    with (
        row_reader(found, matrix) as read,
        progress_bar(total=found.n_cells, unit="cell", desc="explain", disable=not progress) as bar,
    ):
        for start, stop in chunk_ranges(found.n_cells, chunk_cells):
            tokens, values, _ = chunk_tokens(
                found, read, start, stop, positions, n_panel, loaded.preprocessing
            )
            attention = torch.cat(
                [
                    net.attention_sums(t.to(loaded.device)).float().cpu()
                    for t in tokens.split(batch_size)
                ]
            ).numpy()
            sums.add(codes[start:stop], attention, values.toarray())
            bar.update(stop - start)
    return sums


def _explanation(
    sums: _GroupSums,
    codes: np.ndarray,
    names: Any,
    panel: Any,
    *,
    n: int,
    groupby: str,
    min_cells: int,
    top_n: int,
    rank_by: str,
) -> Explanation:
    """The means over the cells of each group of ``min_cells`` or more (expression z-scored over
    all ``n`` cells), and their top genes."""
    import pandas as pd

    counts = np.bincount(codes[codes >= 0], minlength=len(names)).astype(float)
    kept = counts >= min_cells
    if not kept.any():
        raise AnnotationError(f"no group of {groupby!r} has {min_cells} or more cells (min_cells)")
    mean, std = sums.total / n, np.sqrt(np.maximum(sums.total_sq / n - (sums.total / n) ** 2, 0))
    frame = lambda a: pd.DataFrame(  # noqa: E731
        (a / counts[:, None])[kept], index=list(names[kept]), columns=list(panel.genes)
    )
    mean_attention = frame(sums.attention)
    expression = (frame(sums.expression) - mean) / np.where(std > 0, std, 1.0)
    fraction = frame(sums.expressed)
    top = _top_genes(mean_attention, expression, fraction, top_n, rank_by)
    return Explanation(
        groupby,
        rank_by,
        mean_attention,
        expression,
        fraction,
        {str(g): int(c) for g, c in zip(names[kept], counts[kept], strict=True)},
        top,
    )


def _top_genes(attention: Any, expression: Any, fraction: Any, top_n: int, rank_by: str) -> Any:
    import pandas as pd

    spread = attention.std(axis=0).replace(0, 1.0)
    specificity = (attention - attention.mean(axis=0)) / spread
    score = attention if rank_by == "attention" else specificity
    rows = []
    for group in attention.index:
        best = score.loc[group].sort_values(ascending=False, kind="stable").index[:top_n]
        for rank, gene in enumerate(best, start=1):
            rows.append(
                {
                    "cell_type": group,
                    "rank": rank,
                    "gene": gene,
                    "attention": float(attention.at[group, gene]),
                    "specificity": float(specificity.at[group, gene]),
                    "fraction": float(fraction.at[group, gene]),
                    "expression_z": float(expression.at[group, gene]),
                }
            )
    return pd.DataFrame(rows)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "group"


def write_explanation(
    explanation: Explanation,
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> list[Path]:
    """CSV, GMT, per-type gene lists and the two figures in the folder ``out``, written atomically
    (``scbert.atomic.atomic_directory``: an earlier explanation is replaced, a folder of other
    files only with ``overwrite``); logged to the active MLflow run, if any. Returns the files."""
    from scbert.atomic import atomic_directory
    from scbert_platform.infer.plots import log_to_mlflow

    out = Path(out)
    genes = explanation.genes()
    with atomic_directory(out, kind="explanation", overwrite=overwrite, inputs=inputs) as staging:
        explanation.top.to_csv(staging / "top_genes.csv", index=False)
        (staging / "top_genes.gmt").write_text(
            "".join(
                f"{_slug(g)}\tscBERT top {len(v)} genes by {explanation.rank_by} "
                f"({explanation.groupby}={g})\t" + "\t".join(v) + "\n"
                for g, v in genes.items()
            )
        )
        names = ["top_genes.csv", "top_genes.gmt"]
        for group, symbols in genes.items():
            names.append(f"genes_{_slug(group)}.txt")
            (staging / names[-1]).write_text("\n".join(symbols) + "\n")
        names.append(attention_heatmap(explanation, staging / "attention_heatmap.png").name)
        names.append(expression_dotplot(explanation, staging / "expression_dotplot.png").name)
    files = [out / name for name in names]
    log_to_mlflow(files, artifact_path="explain")
    return files


def _columns(explanation: Explanation) -> list[str]:
    """The top genes of all groups, group by group, each gene once."""
    seen: list[str] = []
    for names in explanation.genes().values():
        seen += [g for g in names if g not in seen]
    return seen


def attention_heatmap(explanation: Explanation, path: str | Path) -> Path:
    """Types x their top genes: mean attention, each gene's column z-scored over the types."""
    import matplotlib.pyplot as plt

    from scbert_platform.infer.plots import save_figure

    columns = _columns(explanation)
    table = explanation.attention[columns]
    z = (table - table.mean(axis=0)) / table.std(axis=0).replace(0, 1.0)
    fig, ax = plt.subplots(figsize=(2.0 + 0.22 * len(columns), 1.4 + 0.38 * len(table)))
    image = ax.imshow(z.to_numpy(), cmap="RdBu_r", vmin=-2.5, vmax=2.5, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=6)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    ax.set_title(
        f"attention received per gene, by {explanation.groupby} (top genes by "
        f"{explanation.rank_by}; z-score over types)",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.03, label="attention z-score")
    fig.tight_layout()
    return save_figure(fig, path)


def expression_dotplot(explanation: Explanation, path: str | Path) -> Path:
    """Types x their top genes: colour = z-scored mean expression, size = fraction expressing."""
    import matplotlib.pyplot as plt

    from scbert_platform.infer.plots import save_figure

    columns = _columns(explanation)
    z = explanation.expression[columns].to_numpy()
    fraction = explanation.fraction[columns].to_numpy()
    rows = list(explanation.expression.index)
    fig, ax = plt.subplots(figsize=(2.4 + 0.22 * len(columns), 1.6 + 0.38 * len(rows)))
    yy, xx = np.meshgrid(range(len(rows)), range(len(columns)), indexing="ij")
    dots = ax.scatter(
        xx.ravel(), yy.ravel(), s=8 + 110 * fraction.ravel(), c=z.ravel(),
        cmap="RdBu_r", vmin=-1.5, vmax=1.5, edgecolors="grey", linewidths=0.3,
    )  # fmt: skip
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlim(-0.7, len(columns) - 0.3)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_title(f"expression of the top attention genes, by {explanation.groupby}", fontsize=9)
    fig.colorbar(dots, ax=ax, fraction=0.03, label="mean expression z-score")
    for share in (0.25, 0.5, 1.0):
        ax.scatter(
            [], [], s=8 + 110 * share, c="lightgrey", edgecolors="grey", label=f"{share:.0%}"
        )
    ax.legend(
        title="expressing", fontsize=6, title_fontsize=7, loc="upper left",
        bbox_to_anchor=(1.08, 0.0), frameon=False,
    )  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, path)
