"""``scbert ingest``: raw counts -> validated, panel-aligned, normalised Parquet cell shards.

Steps, as published (DESIGN.md), each a function of ``scbert_platform.data.preprocess`` shared with
every inference path: validate the counts, align the genes to the panel by symbol (or by a
``var`` id column), drop cells with fewer than ``min_genes`` expressed panel genes,
``normalize_total`` to ``target_sum``, ``log2(1 + x)``. Binning happens at load time
(``scbert_platform.data.loader``); the manifest records the values, and training copies them
into the model's ``preprocessing.json``.

The input is opened by ``data.inputs`` and read in row chunks straight from the HDF5 file
(``data.readers``; no whole-matrix load), one task per chunk, on Ray Data (or in this process
for inputs of a single chunk, with the same functions):

1. (only when no panel is given) count the cells expressing each gene, to build the panel;
2. scan: validate every value, count each cell's expressed panel genes and counts;
3. plan: QC, stratified folds over the kept cells (``data.splits``), shards of about
   ``shard_mb`` (``data.shards``);
4. write: one task per shard, into a staging directory renamed into place at the end, with the
   panel and the manifest (``data.manifest``).

Any bad input stops at step 2 or before, with an ``IngestError`` naming the problem and the fix,
and nothing is written; a crash or Ctrl-C at any point leaves the previous output intact.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from scbert.atomic import atomic_directory, check_output
from scbert_platform.data.errors import IngestError
from scbert_platform.data.inputs import InputTable, open_input
from scbert_platform.data.manifest import PANEL_FILE, KeptCells, Manifest
from scbert_platform.data.panel import Panel, PanelError
from scbert_platform.data.preprocess import (
    COUNT_RECOVERY_TOLERANCE,
    align,
    count_scale_deviation,
    qc,
)
from scbert_platform.data.readers import ChunkSpec, read_counts
from scbert_platform.data.shards import ShardSpec, plan_shards, write_shard
from scbert_platform.data.splits import assign_folds
from scbert_platform.params import DataParams

Say = Callable[[str], None]

# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class IngestReport:
    output: str
    n_cells_in: int
    n_cells_kept: int
    n_shards: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False)


def ingest(
    source: str | Path,
    output: str | Path,
    params: DataParams,
    *,
    executor: str = "auto",
    overwrite: bool = False,
    log: Say | None = None,
) -> IngestReport:
    """Ingest ``source`` into the shard directory ``output`` (replaced atomically).

    ``executor``: ``ray`` (Ray Data tasks), ``local`` (this process) or ``auto`` (``ray`` when
    the input has more than one chunk of ``params.chunk_cells`` cells). ``output`` may be absent,
    empty or earlier shards; anything else is refused before any work unless ``overwrite``
    (``scbert.atomic.check_output``).
    """
    say = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    source, output = Path(source), Path(output)
    inputs = [source, *([params.panel] if params.panel else [])]
    check_output(output, kind="shards", overwrite=overwrite, inputs=inputs)
    _check_settings(executor, params)
    with (
        _full_disk_as_error(output),
        tempfile.TemporaryDirectory(prefix="scbert-ingest-") as scratch,
    ):
        table = open_input(source, params, Path(scratch))
        chunks = _chunks(table, params, 0, table.n_cells)
        use_ray = executor == "ray" or (executor == "auto" and len(chunks) > 1)
        _say_input(table, len(chunks), use_ray, params, say)
        with _ray_session(use_ray):
            stage = partial(
                atomic_directory, output, kind="shards", overwrite=overwrite, inputs=inputs
            )
            dataset = params.name or output.name
            manifest = _ingest(table, chunks, stage, params, use_ray, say, dataset)
    seconds = time.perf_counter() - started
    cells = manifest["cells"]
    say(
        f"wrote {cells['kept']} of {cells['input']} cells in {len(manifest['shards'])} shard(s) "
        f"to {output} in {seconds:.1f} s"
    )
    return IngestReport(
        str(output), cells["input"], cells["kept"], len(manifest["shards"]), seconds, manifest
    )


def _check_settings(executor: str, params: DataParams) -> None:
    if executor not in ("auto", "ray", "local"):
        raise ValueError(f"executor must be auto, ray or local, got {executor!r}")
    if params.chunk_cells < 1 or params.shard_mb <= 0 or params.min_genes < 0:
        raise IngestError("data.chunk_cells and data.shard_mb must be positive, min_genes >= 0")


def _say_input(
    table: InputTable, n_chunks: int, use_ray: bool, params: DataParams, say: Say
) -> None:
    say(
        f"ingest {table.path} ({table.kind}, {table.n_cells} cells x {len(table.genes)} genes, "
        f"matrix {table.source.location}) in {n_chunks} chunk(s) "
        f"{'on Ray Data' if use_ray else 'in this process'}"
    )
    if params.input == "log1p":
        base = "e" if table.log_base is None else f"{table.log_base:g}"
        say(f"input is log-normalised (log1p, base {base}): inverted with base**v - 1")


def _chunks(table: InputTable, params: DataParams, start: int, stop: int) -> list[ChunkSpec]:
    """Rows ``start..stop-1`` of the input in chunks of ``data.chunk_cells`` rows."""
    return [
        ChunkSpec(
            table.source,
            begin,
            min(begin + params.chunk_cells, stop),
            params.input,
            table.log_base,
            tuple(table.cell_ids[begin : min(begin + params.chunk_cells, stop)]),
        )
        for begin in range(start, stop, params.chunk_cells)
    ]


# ---------------------------------------------------------------------------------------------
# The steps


def _ingest(
    table: InputTable,
    chunks: list[ChunkSpec],
    stage: Callable[[], AbstractContextManager[Path]],
    params: DataParams,
    use_ray: bool,
    say: Say,
    dataset: str,
) -> dict[str, Any]:
    """Steps 1-4 of the module's docstring; the manifest written."""
    panel = _panel(table, chunks, params, use_ray, say)
    positions = _match_panel(table, panel, params, say)
    n_genes, n_counts, recover = _scan(chunks, positions, len(panel), params, use_ray, say)
    cells = _keep_cells(table, n_genes, n_counts, params, say)
    with stage() as staging:  # atomic_directory: the shards replace output only when complete
        shards = _shard_specs(table, cells, params, staging, recover)
        write = partial(write_shard, positions=positions, n_panel=len(panel))
        kept = [sum(len(k) for k in shard.keep) for shard in shards]
        results = _run(write, shards, use_ray, "write", kept)
        panel.write(staging / PANEL_FILE)
        return Manifest(
            dataset=dataset,
            params=params,
            table=table,
            panel=panel,
            genes_found=int((positions >= 0).sum()),
            cells=cells,
            counts_recovered=recover,
            shards=results,
        ).write(staging)


def _panel(
    table: InputTable, chunks: list[ChunkSpec], params: DataParams, use_ray: bool, say: Say
) -> Panel:
    """Step 1: the panel of data.panel, or one built from the genes the cells express."""
    if params.panel:
        try:
            return Panel.from_file(params.panel)
        except PanelError as err:
            raise IngestError(str(err)) from err
    say(f"building the panel: genes expressed in >= {params.panel_min_cells} cells")
    counts = sum(
        _run(gene_cell_counts, chunks, use_ray, "panel", [c.stop - c.start for c in chunks])
    )
    try:
        return Panel.from_cell_counts(
            table.genes, np.asarray(counts), min_cells=params.panel_min_cells, name="data"
        )
    except PanelError as err:
        raise IngestError(str(err)) from err


def _match_panel(table: InputTable, panel: Panel, params: DataParams, say: Say) -> np.ndarray:
    """The panel position of each input gene (-1: not in the panel); too few of the panel's
    genes in the input (data.min_coverage) is an IngestError."""
    positions = panel.positions(table.genes)
    found = int((positions >= 0).sum())
    coverage = found / len(panel)
    say(f"panel {panel.name}: {found} of {len(panel)} genes found in the data ({coverage:.1%})")
    if coverage < params.min_coverage:
        present = set(table.genes)
        missing = [g for g in panel.genes if g not in present][:5]
        raise IngestError(
            f"only {found} of the panel's {len(panel)} genes ({coverage:.1%}) are in the data, "
            f"below data.min_coverage={params.min_coverage:.0%}; panel genes missing e.g. "
            f"{missing}, data genes e.g. {table.genes[:5]}: check that both use the same "
            "naming (symbols vs Ensembl ids: --gene-id-column), or lower data.min_coverage"
        )
    return positions


def _scan(
    chunks: list[ChunkSpec],
    positions: np.ndarray,
    n_panel: int,
    params: DataParams,
    use_ray: bool,
    say: Say,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Step 2: every value validated; each cell's expressed panel genes and panel counts, and
    whether log-normalised input can be turned back into counts."""
    scan = partial(scan_chunk, positions=positions, n_panel=n_panel)
    scans = _run(scan, chunks, use_ray, "scan", [c.stop - c.start for c in chunks])
    n_genes = np.concatenate([s.n_genes for s in scans])
    n_counts = np.concatenate([s.n_counts for s in scans])
    recover = False
    if params.input == "log1p":
        deviation = max(s.scale_deviation for s in scans)
        recover = deviation <= COUNT_RECOVERY_TOLERANCE
        say(
            "counts recovered by dividing each cell by its smallest value (a count of 1), "
            f"max deviation from integers {deviation:.3g}"
            if recover
            else f"counts not recoverable (deviation {deviation:.3g}): normalised values used"
        )
    return n_genes, n_counts, recover


def _keep_cells(
    table: InputTable, n_genes: np.ndarray, n_counts: np.ndarray, params: DataParams, say: Say
) -> KeptCells:
    """Step 3, the cells: QC (data.min_genes), and the kept cells' stratified folds."""
    low, empty = qc(n_genes, n_counts, params.min_genes)
    kept_rows = np.flatnonzero(~(low | empty))
    if kept_rows.size == 0:
        raise IngestError(
            f"no cell has at least {params.min_genes} expressed panel genes (data.min_genes); "
            f"the most any cell has is {int(n_genes.max())}: lower data.min_genes"
        )
    kept_ids = [table.cell_ids[i] for i in kept_rows]
    kept_labels = None if table.labels is None else [table.labels[i] for i in kept_rows]
    kept_batches = None if table.batches is None else [table.batches[i] for i in kept_rows]
    if kept_batches is not None:
        per_batch = ", ".join(f"{b} {n}" for b, n in sorted(Counter(kept_batches).items()))
        say(f"cells kept per {params.batch_key} (data.batch_key): {per_batch}")
    folds = assign_folds(kept_ids, kept_labels, params.n_folds, params.seed)
    return KeptCells(n_genes, low, empty, kept_labels, kept_batches, folds)


def _shard_specs(
    table: InputTable, cells: KeptCells, params: DataParams, staging: Path, recover: bool
) -> list[ShardSpec]:
    """Step 3, the shards: the kept cells cut into shards of about data.shard_mb, each read
    from the input chunks that hold its cells."""
    kept_rows = cells.rows
    fold_of = np.full(table.n_cells, -1, dtype=np.int8)
    fold_of[kept_rows] = cells.folds

    def spec(part: int, rows: np.ndarray) -> ShardSpec:
        windows = _chunks(table, params, int(rows[0]), int(rows[-1]) + 1)
        keeps = [rows[(rows >= w.start) & (rows < w.stop)] for w in windows]
        return ShardSpec(
            chunks=tuple(windows),
            keep=tuple(k - w.start for k, w in zip(keeps, windows, strict=True)),
            folds=tuple(fold_of[k] for k in keeps),
            labels=tuple(
                tuple(None if table.labels is None else table.labels[i] for i in k) for k in keeps
            ),
            part=part,
            directory=str(staging),
            recover_counts=recover,
            target_sum=params.target_sum,
            batches=None
            if table.batches is None
            else tuple(tuple(table.batches[i] for i in k) for k in keeps),
        )

    bounds = plan_shards(cells.n_genes[kept_rows], params.shard_mb)
    return [spec(part, kept_rows[lo:hi]) for part, (lo, hi) in enumerate(bounds)]


# ---------------------------------------------------------------------------------------------
# Per-chunk work (runs in Ray tasks or in this process); writing a shard is shards.write_shard


def gene_cell_counts(spec: ChunkSpec) -> np.ndarray:
    """Number of cells expressing each input gene in this chunk (for building a panel)."""
    with spec.source.rows() as rows:
        x = read_counts(spec, rows)
    return np.bincount(x.indices, minlength=x.shape[1])


@dataclass
class ScanResult:
    start: int
    n_genes: np.ndarray  # expressed panel genes per cell
    n_counts: np.ndarray  # total (panel) counts per cell
    scale_deviation: float


def scan_chunk(spec: ChunkSpec, positions: np.ndarray, n_panel: int) -> ScanResult:
    """Validate a chunk and measure its cells for QC."""
    with spec.source.rows() as rows:
        x = read_counts(spec, rows)
    deviation = count_scale_deviation(x) if spec.input == "log1p" else 0.0
    aligned = align(x, positions, n_panel)
    return ScanResult(
        spec.start,
        np.diff(aligned.indptr).astype(np.int32),
        np.asarray(aligned.sum(axis=1)).ravel(),
        deviation,
    )


# ---------------------------------------------------------------------------------------------
# Execution


def _run(
    fn: Callable[..., Any], items: Sequence[Any], use_ray: bool, desc: str, cells: Sequence[int]
) -> list[Any]:
    """``[fn(item) for item in items]``: on Ray Data, one task per item, or in this process;
    a bar counts the cells (``cells[i]`` in item ``i``) as the items finish."""
    from scbert_platform.console import progress

    bar = progress(total=sum(cells), desc=f"ingest: {desc}", unit="cell", disable=len(items) < 2)
    with bar:
        if not use_ray:
            done = []
            for item, n in zip(items, cells, strict=True):
                done.append(fn(item))
                bar.update(n)
            return done
        import ray

        payloads = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
        dataset = ray.data.from_items(payloads, override_num_blocks=len(payloads))
        rows = []
        for row in dataset.map(_ray_call, fn_kwargs={"fn": pickle.dumps(fn)}).iter_rows():
            rows.append(row)
            bar.update(cells[row["i"]])
    errors = sorted((row["i"], row["error"]) for row in rows if row["error"])
    if errors:  # the first in input order, as the in-process run would report it
        raise IngestError(errors[0][1])
    rows.sort(key=lambda row: row["i"])
    return [pickle.loads(row["result"]) for row in rows]


def _ray_call(row: dict[str, Any], fn: bytes) -> dict[str, Any]:
    """Ray Data map function: run a pickled function on a pickled item. An IngestError comes
    back as data: Ray would wrap it in its own exception types on the way to the driver."""
    try:
        result = pickle.dumps(pickle.loads(fn)(pickle.loads(row["item"])))
    except IngestError as err:
        return {"i": row["i"], "result": b"", "error": str(err)}
    return {"i": row["i"], "result": result, "error": ""}


@contextmanager
def _ray_session(use_ray: bool) -> Iterator[None]:
    """Start a local Ray if none is running (and stop it after); use a running one as is."""
    if not use_ray:
        yield
        return
    import ray

    from scbert_platform.cluster import start_ray

    started = not ray.is_initialized()
    if started:
        start_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# A full disk


@contextmanager
def _full_disk_as_error(output: Path) -> Iterator[None]:
    """A full disk as an ``IngestError`` naming ``output``, not a traceback from deep inside
    pyarrow or a Ray task. By the time it gets here ``atomic_directory`` has removed the staging
    directory, so the previous output, if any, is as it was."""
    existed = output.exists()
    try:
        yield
    except Exception as err:
        if not _no_space_left(err):
            raise
        kept = f"the previous {output} is unchanged" if existed else "nothing was written"
        raise IngestError(
            f"no space left on the device while writing {output}: free some space (or write "
            f"elsewhere with --out) and run `scbert ingest` again; {kept}"
        ) from err


def _no_space_left(err: BaseException | None) -> bool:
    """Whether ``err`` or an error behind it is ENOSPC (Ray keeps the task's error as ``cause``;
    an error that crossed a process as text keeps only its message)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(err):
            return True
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return False
