"""From Parquet cell shards to model batches: densify, bin, append the extra position.

Two ways, one binning (``scbert.tokens.bin_values``):

- ``CellBatcher``, plain numpy/pyarrow (no Ray): shard rows -> dense ``{"tokens", "label"}``.
  Serving, notebooks and validation use it (``iter_local_batches``).
- ``cell_dataset`` + ``dense_batches``, for training on Ray. The Ray Data pipeline bins the
  expressed genes and ships *sparse* rows through the object store; the consumer (a training
  worker) densifies each batch, on its GPU when it has one:

      read_parquet(shards) -> filter(fold) -> map_batches(SparseBinner)   [Ray Data tasks]
        -> iter_batches(pyarrow, local shuffle) -> densify                 [the training worker]

  A kept gene costs 3 bytes (uint16 gene index + uint8 token; genes in bin 0 are dropped, as
  they are 0 once dense) where a dense row costs a byte per panel position, and a GPU receives
  the sparse rows (pinned, non-blocking) and scatters them on the device. Sizes and speeds
  measured: bench/RESULTS.md (``bench/loader_speed.py``).

Shuffling: Ray Data's full ``random_shuffle`` moves every cell through the object store each
epoch. Instead, the file order is randomised per epoch and batches are drawn from a local shuffle
buffer of ``shuffle_buffer`` cells: cells only mix with cells within the buffer's reach (a few
shards' worth), which is enough when shards are not sorted by label (ingest keeps the input's
order, so a label-sorted input gives label-sorted shards: use a buffer larger than a shard then).
For Ray Train, pass the dataset to the trainer: each worker's ``get_dataset_shard`` gets a disjoint
part (``streaming_split``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scbert.tokens import APPENDED_TOKEN, bin_values
from scbert_platform.data.errors import ShardError
from scbert_platform.data.manifest import MANIFEST, PANEL_FILE, read_manifest, reingest_hint
from scbert_platform.data.readers import file_sha256
from scbert_platform.data.splits import CellSplit

SHARD_GLOB = "part-*.parquet"
NO_LABEL = -1  # label id of unlabelled cells and of labels outside the vocabulary
# (path, size, mtime, inode) of shards whose sha256 matched their manifest in this process:
# a process that reads the directory's info again (a notebook, a second loader) hashes once
_VERIFIED: set[tuple[str, int, int, int]] = set()


def shard_files(directory: str | Path) -> list[str]:
    """The Parquet shards of an ingested directory, in order."""
    files = sorted(str(p) for p in Path(directory).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"{directory} holds no part-*.parquet shards: run scbert ingest")
    return files


@dataclass(frozen=True)
class ShardInfo:
    """What a loader needs to know of an ingested directory."""

    directory: Path
    n_genes: int
    panel: list[str]
    labels: list[str]  # the label vocabulary (sorted), index = label id
    n_cells: int

    @classmethod
    def read(cls, directory: str | Path, *, digests: bool = True) -> ShardInfo:
        """The directory's manifest and panel, after ``check_shards``: a damaged directory fails
        here, before Ray or MLflow start anything. ``digests=False`` (a training worker, whose
        driver checked them before starting it) checks the shards' presence and sizes only."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        check_shards(directory, manifest, digests=digests)
        panel = (directory / PANEL_FILE).read_text().splitlines()
        if len(panel) != manifest["panel"]["n_genes"]:
            raise ValueError(f"{directory}: {PANEL_FILE} does not match the manifest")
        labels = sorted(k for k in manifest["labels"]["counts"] if k != "<unlabelled>")
        return cls(directory, len(panel), panel, labels, manifest["cells"]["kept"])


def check_shards(directory: str | Path, manifest: dict[str, Any], *, digests: bool = True) -> None:
    """Every shard the manifest lists is on disk, whole (its size) and unchanged (its sha256),
    and no other shard is there; else a ``ShardError`` naming the file.

    Without this, a truncated shard fails inside a Ray Data read task once training has started
    (a worker's traceback), and bytes changed inside a page either fail the same way or, where
    the page still decodes, give wrong values silently. A manifest without a shard list (written
    by hand) is not checked. Each shard is hashed once per process; later calls, e.g. every
    validation, only look at the files' sizes.
    """
    listed = manifest.get("shards")
    if not isinstance(listed, list):
        return
    directory = Path(directory)
    fix = reingest_hint(directory, manifest)
    names = set()
    for entry in listed:
        path = directory / entry["file"]
        names.add(path.name)
        _check_shard(path, entry, directory / MANIFEST, fix, digests)
    for path in sorted(directory.glob(SHARD_GLOB)):
        if path.name not in names:
            raise ShardError(
                f"{path} is not listed in {directory / MANIFEST} (left by another ingest, or "
                f"copied in): every part-*.parquet is read as training data; {fix}"
            )


def _check_shard(path: Path, entry: dict[str, Any], manifest: Path, fix: str, digest: bool) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{path} is missing (listed in {manifest}): {fix}") from None
    if "n_bytes" in entry and stat.st_size != entry["n_bytes"]:
        raise ShardError(
            f"{path} is truncated or corrupted ({stat.st_size:,} bytes, {manifest} says "
            f"{entry['n_bytes']:,}): {fix}"
        )
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if not digest or "sha256" not in entry or key in _VERIFIED:
        return
    if file_sha256(path) != entry["sha256"]:
        raise ShardError(
            f"{path} is corrupted (its sha256 is not the one {manifest} records; it changed "
            f"after ingest): {fix}"
        )
    _VERIFIED.add(key)


class CellBatcher:
    """Shard rows -> ``{"tokens": (b, n_genes + 1), "label": (b,) int64}``.

    Tokens are ``min(value, n_bins)`` truncated (``scbert.tokens.bin_values``) with the appended
    position (token 0) last. ``dtype`` uint8 by default: 17 kB per paper-size cell instead of
    135 kB as int64, which the model widens on the device.
    """

    def __init__(
        self,
        n_genes: int,
        n_bins: int,
        labels: Sequence[str] = (),
        *,
        dtype: Any = np.uint8,
    ) -> None:
        if n_bins + 1 > np.iinfo(dtype).max:
            raise ValueError(f"n_bins={n_bins} does not fit tokens of dtype {np.dtype(dtype)}")
        self.n_genes = n_genes
        self.n_bins = n_bins
        self.dtype = dtype
        self.label_ids = {label: i for i, label in enumerate(labels)}

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """``batch``: a pyarrow Table (or a dict of columns) in the shard schema."""
        offsets, genes, tokens = self.binned(batch)
        dense = scatter_tokens(offsets, genes, tokens, self.n_genes, dtype=self.dtype)
        return {"tokens": dense, "label": self.encode_labels(_column(batch, "label"))}

    def binned(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows' (offsets, gene indices, tokens), sparse: the shard's expressed genes."""
        offsets, genes = _flat_lists(batch, "gene_idx")
        _, values = _flat_lists(batch, "value")
        if genes.size and int(genes.max()) >= self.n_genes:
            raise ValueError(f"gene index {int(genes.max())} outside a panel of {self.n_genes}")
        return offsets, genes, bin_values(values, self.n_bins, dtype=self.dtype)

    def encode_labels(self, labels: Sequence[Any]) -> np.ndarray:
        return np.fromiter(
            (self.label_ids.get(label, NO_LABEL) for label in labels),
            dtype=np.int64,
            count=len(labels),
        )


def scatter_tokens(
    offsets: np.ndarray, genes: np.ndarray, tokens: np.ndarray, n_genes: int, *, dtype: Any
) -> np.ndarray:
    """Dense (b, n_genes + 1) tokens from CSR rows, the appended position (token 0) last."""
    n_cells, width = len(offsets) - 1, n_genes + 1
    dense = np.zeros((n_cells, width), dtype=dtype)
    # intp indices: numpy converts any other index type to it first (bench/RESULTS.md)
    flat = np.repeat(np.arange(0, n_cells * width, width, dtype=np.intp), np.diff(offsets))
    flat += genes
    dense.reshape(-1)[flat] = tokens
    dense[:, -1] = APPENDED_TOKEN
    return dense


def _column(batch: Any, name: str) -> list[Any]:
    column = batch[name]
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)


def values_matrix(batch: Any, n_genes: int) -> Any:
    """The normalised values of shard rows (a pyarrow Table) as CSR (cells x n_genes)."""
    import scipy.sparse as sp

    offsets, genes = _flat_lists(batch, "gene_idx")
    _, values = _flat_lists(batch, "value")
    return sp.csr_matrix(
        (values, genes.astype(np.int64), offsets), shape=(len(offsets) - 1, n_genes)
    )


def _flat_lists(batch: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat values) of a list column, from Arrow without a Python-level loop."""
    import pyarrow as pa

    column = batch[name]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ListArray | pa.LargeListArray):
        offsets = column.offsets.to_numpy()
        flat = column.values.to_numpy(zero_copy_only=False)
        return offsets - offsets[0], flat[offsets[0] : offsets[-1]]
    lists = [np.asarray(x) for x in column]  # numpy batch format: an object array of arrays
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(lists) if lists else np.zeros(0)
    return offsets, flat


def iter_local_batches(
    directory: str | Path,
    n_bins: int,
    *,
    batch_size: int = 64,
    folds: Sequence[int] | None = None,
    exclude_folds: Sequence[int] = (),
    split: CellSplit | None = None,
    role: str = "val",
    read_ahead: int = 4,
    digests: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches from shards in this process, in file order (no Ray): notebooks, serving, tests.

    A background thread reads and decodes the Parquet (pyarrow releases the GIL) up to
    ``read_ahead`` batches ahead while this thread densifies and bins, so that reading overlaps
    binning. ``read_ahead=0`` reads in this thread.
    ``split`` and ``role`` keep the cells of one role of a ``CellSplit`` (after the fold filter).
    ``digests=False`` skips hashing the shards (a caller that checked them already).
    """
    info = ShardInfo.read(directory, digests=digests)
    batcher = CellBatcher(info.n_genes, n_bins, info.labels)
    batches = _record_batches(
        shard_files(directory), batch_size, folds, exclude_folds, split=split, role=role
    )
    for record_batch in prefetch(batches, read_ahead) if read_ahead > 0 else batches:
        yield batcher(record_batch)


def _record_batches(
    files: Sequence[str],
    batch_size: int,
    folds: Sequence[int] | None,
    exclude_folds: Sequence[int],
    *,
    split: CellSplit | None = None,
    role: str = "val",
) -> Iterator[Any]:
    columns = _read_columns(split)
    for file in files:
        for record_batch in _shard_batches(file, batch_size, columns):
            keep = _fold_mask(record_batch.column("fold").to_numpy(), folds, exclude_folds)
            if split is not None:
                keep &= split.mask(record_batch, role)
            if keep.all():
                yield record_batch
            elif keep.any():
                yield record_batch.filter(keep)


def _shard_batches(file: str, batch_size: int, columns: list[str]) -> Iterator[Any]:
    """One shard's record batches; a shard that cannot be decoded (damaged after
    ``check_shards`` ran, or never checked) is a ``ShardError`` naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(file, memory_map=True)
        yield from shard.iter_batches(batch_size=batch_size, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(
            f"{file} cannot be read ({err}); if it was damaged after ingest, "
            f"{reingest_hint(Path(file).parent)}"
        ) from err


def prefetch(
    items: Iterator[Any],
    depth: int,
    *,
    timeout_s: float | None = None,
    timeout_message: str = "",
) -> Iterator[Any]:
    """``items`` produced by a daemon thread, at most ``depth`` ahead; its errors re-raised here.
    With ``timeout_s``, waiting longer than that for the next item raises
    ``TimeoutError(timeout_message)``. Stopping early (break, close) stops the thread."""
    import queue
    import threading

    done = object()
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer
            put(err)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = buffer.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(timeout_message or f"no item for {timeout_s} s") from None
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)


def _fold_mask(
    fold: np.ndarray, folds: Sequence[int] | None, exclude_folds: Sequence[int]
) -> np.ndarray:
    keep = np.ones(len(fold), dtype=bool) if folds is None else np.isin(fold, list(folds))
    return keep & ~np.isin(fold, list(exclude_folds))


def cell_dataset(
    directory: str | Path,
    n_bins: int,
    *,
    folds: Sequence[int] | None = None,
    exclude_folds: Sequence[int] = (),
    split: CellSplit | None = None,
    role: str = "train",
    batch_size: int = 2048,
    shuffle_files: bool = True,
) -> Any:
    """A Ray Data Dataset of sparse binned cells ``{"gene_idx", "token", "label"}`` from an
    ingested directory; ``dense_batches`` turns it (or a Ray Train worker's shard of it) into
    dense model batches.

    ``folds`` keeps those folds (e.g. the validation fold), ``exclude_folds`` drops them (e.g.
    training = all folds but one); ``split`` keeps the cells of one ``role`` of a ``CellSplit``
    (applied to each block in the transform). ``batch_size`` is the transform's block of cells
    (large blocks amortise Ray's per-block cost).
    """
    import ray.data
    from ray.data.expressions import col

    info = ShardInfo.read(directory)
    dataset = ray.data.read_parquet(
        shard_files(directory), shuffle="files" if shuffle_files else None
    ).select_columns(_read_columns(split))  # pushed down into the reader
    if folds is not None:
        dataset = dataset.filter(expr=col("fold").is_in(list(folds)))
    if exclude_folds:
        dataset = dataset.filter(expr=col("fold").not_in(list(exclude_folds)))
    batcher = CellBatcher(info.n_genes, n_bins, info.labels)
    return dataset.map_batches(
        _sparse_rows,
        fn_kwargs={"batcher": batcher, "split": split, "role": role},
        batch_format="pyarrow",
        batch_size=batch_size,
    )


def _sparse_rows(
    batch: Any, batcher: CellBatcher, split: CellSplit | None = None, role: str = "train"
) -> Any:
    """Ray Data task function (a plain function: no actor start-up per pipeline): shard rows ->
    ``{"gene_idx": list<uint16|int32>, "token": list<uint8>, "label": int64}``, keeping the genes
    whose token is not 0 (what densifying leaves 0 anyway)."""
    import pyarrow as pa

    if split is not None:
        batch = batch.filter(split.mask(batch, role))
    offsets, genes, tokens = batcher.binned(batch)
    kept = tokens != 0
    offsets = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])[offsets].astype(np.int32)
    gene_type = np.uint16 if batcher.n_genes <= np.iinfo(np.uint16).max + 1 else np.int32
    genes = genes[kept].astype(gene_type, copy=False)
    return pa.table(
        {
            "gene_idx": pa.ListArray.from_arrays(pa.array(offsets), pa.array(genes)),
            "token": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens[kept])),
            "label": pa.array(batcher.encode_labels(_column(batch, "label"))),
        }
    )


def dense_batches(
    data: Any,
    n_genes: int,
    *,
    batch_size: int,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    device: Any = "cpu",
    prefetch_batches: int = 4,
) -> Iterator[dict[str, Any]]:
    """``{"tokens": (b, n_genes + 1) uint8, "label": (b,) int64}`` torch batches on ``device``
    from a ``cell_dataset`` or a Ray Train worker's ``get_dataset_shard`` of one.

    Ray Data's iterator fetches whole blocks of sparse rows; ``SparseShuffle`` draws each batch's
    cells at random from a buffer of at least ``shuffle_buffer`` cells (``None``/0: the blocks'
    order) by index, without copying the buffer; a background thread densifies the chosen rows
    while the model runs. For a GPU the chosen rows go in pinned memory, are copied without
    blocking, and are scattered into the dense batch on the device.
    """
    import torch

    device = torch.device(device)
    blocks = (
        _sparse_block(table)
        for table in data.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches
        )
    )
    draws = SparseShuffle(batch_size, shuffle_buffer or 0, seed).draws(blocks)
    if device.type == "cuda":
        for batch in prefetch((sparse_tensors(gather(draw), pin=True) for draw in draws), 2):
            yield _scatter_on_device(batch, n_genes, device)
        return
    yield from prefetch((densify(draw, n_genes) for draw in draws), prefetch_batches)


SparseRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # offsets, genes, tokens, labels


class EpochCache:
    """A Ray Data dataset (or a worker's shard of one) whose blocks are kept in memory during the
    first pass when they total at most ``max_bytes``: later passes replay them instead of running
    the pipeline again, which costs seconds per epoch, a large share of a small dataset's epoch
    (docs/training.md, "Small data").

    A pass that is stopped early, or whose blocks outgrow ``max_bytes``, keeps nothing, and the
    next one reads through Ray Data again. Each epoch's order of cells still comes from
    ``SparseShuffle`` with the epoch's seed; a worker replays the cells of its own first pass."""

    def __init__(self, data: Any, max_bytes: float) -> None:
        self.data, self.max_bytes = data, max_bytes
        self.blocks: list[Any] | None = None
        self.too_big = max_bytes <= 0

    def iter_batches(self, **options: Any) -> Iterator[Any]:
        if self.blocks is not None:
            yield from self.blocks
            return
        kept: list[Any] | None = None if self.too_big else []
        size = 0
        for table in self.data.iter_batches(**options):
            if kept is not None:
                size += table.nbytes
                if size > self.max_bytes:
                    kept, self.too_big = None, True
                else:
                    kept.append(table)
            yield table
        self.blocks = kept


def _sparse_block(table: Any) -> SparseRows:
    offsets, genes = _flat_lists(table, "gene_idx")
    _, tokens = _flat_lists(table, "token")
    return offsets, genes, tokens, table["label"].to_numpy(zero_copy_only=False)


# one batch's cells: (block, the block's rows drawn), grouped by block (the order of cells
# within a batch does not matter to training)
Draw = list[tuple[SparseRows, np.ndarray]]


class SparseShuffle:
    """Batches of ``batch_size`` cells drawn at random from a buffer of sparse blocks.

    A batch is drawn once the buffer holds ``shuffle_buffer + batch_size`` cells (or the blocks
    have run out); a block leaves the buffer when its last cell has been drawn. A draw is only
    indices into the blocks: each cell's genes are copied once, by ``densify`` into its dense
    row (or by ``gather`` into a sparse batch). ``shuffle_buffer=0`` keeps the blocks' order.
    """

    def __init__(self, batch_size: int, shuffle_buffer: int, seed: int | None) -> None:
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.rng = np.random.default_rng(seed)

    def draws(self, blocks: Iterator[SparseRows]) -> Iterator[Draw]:
        buffer: list[SparseRows] = []
        block_of = np.zeros(0, dtype=np.int64)  # (cells waiting,) index into buffer
        row_of = np.zeros(0, dtype=np.int64)
        exhausted = False
        while True:
            while not exhausted and len(row_of) < self.shuffle_buffer + self.batch_size:
                block = next(blocks, None)
                if block is None:
                    exhausted = True
                    break
                n = len(block[0]) - 1
                block_of = np.concatenate([block_of, np.full(n, len(buffer))])
                row_of = np.concatenate([row_of, np.arange(n)])
                buffer.append(block)
            if len(row_of) == 0:
                return
            take = min(self.batch_size, len(row_of))
            if self.shuffle_buffer:
                chosen = self.rng.choice(len(row_of), size=take, replace=False)
            else:
                chosen = np.arange(take)
            blocks_drawn, rows_drawn = block_of[chosen], row_of[chosen]
            yield [(buffer[b], rows_drawn[blocks_drawn == b]) for b in np.unique(blocks_drawn)]
            keep = np.ones(len(row_of), dtype=bool)
            keep[chosen] = False
            block_of, row_of = block_of[keep], row_of[keep]
            buffer, block_of = _drop_drawn_blocks(buffer, block_of)


def _row_ranges(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths of ``rows``, the positions of their entries in the flat arrays, row by row)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return lengths, np.repeat(starts - (ends - lengths), lengths) + np.arange(total)


def gather(draw: Draw) -> SparseRows:
    """A draw's cells as one CSR batch (offsets, genes, tokens, labels)."""
    parts = []
    for (offsets, genes, tokens, labels), rows in draw:
        lengths, source = _row_ranges(offsets, rows)
        parts.append((lengths, genes[source], tokens[source], labels[rows]))
    lengths = np.concatenate([p[0] for p in parts])
    return (
        np.concatenate([[0], np.cumsum(lengths)]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]),
    )


def densify(draw: Draw, n_genes: int) -> dict[str, Any]:
    """A draw's cells as dense torch tokens (b, n_genes + 1) uint8 and labels, scattered from
    the blocks straight into the batch (``scatter_tokens`` without the CSR in between)."""
    import torch

    width = n_genes + 1
    n_cells = sum(len(rows) for _, rows in draw)
    dense = np.zeros((n_cells, width), dtype=np.uint8)
    flat_dense, labels, first = dense.reshape(-1), np.empty(n_cells, dtype=np.int64), 0
    for (offsets, genes, tokens, block_labels), rows in draw:
        lengths, source = _row_ranges(offsets, rows)
        row_starts = np.arange(first * width, (first + len(rows)) * width, width)  # intp
        flat_dense[np.repeat(row_starts, lengths) + genes[source]] = tokens[source]
        labels[first : first + len(rows)] = block_labels[rows]
        first += len(rows)
    dense[:, -1] = APPENDED_TOKEN
    return {"tokens": torch.from_numpy(dense), "label": torch.from_numpy(labels)}


def _drop_drawn_blocks(
    buffer: list[SparseRows], block_of: np.ndarray
) -> tuple[list[SparseRows], np.ndarray]:
    """The buffer without blocks whose cells have all been drawn (indices renumbered)."""
    alive = np.zeros(len(buffer), dtype=bool)
    alive[block_of] = True
    if alive.all():
        return buffer, block_of
    renumber = np.cumsum(alive) - 1
    return [b for b, a in zip(buffer, alive, strict=True) if a], renumber[block_of]


def sparse_tensors(batch: SparseRows, *, pin: bool) -> dict[str, Any]:
    """A CSR batch as the tensors ``_scatter_on_device`` takes; ``pin``: in pinned memory (for
    a non-blocking copy to a GPU)."""
    import torch

    offsets, genes, tokens, labels = batch
    arrays = {
        "lengths": np.diff(offsets),
        "genes": genes.astype(np.int32),
        "values": tokens,
        "label": labels,
    }
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return {k: v.pin_memory() for k, v in tensors.items()} if pin else tensors


def _scatter_on_device(batch: dict[str, Any], n_genes: int, device: Any) -> dict[str, Any]:
    """``scatter_tokens`` on the device (a GPU), from pinned sparse rows: (b, n_genes + 1)."""
    import torch

    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    lengths, genes = moved["lengths"], moved["genes"]
    n_cells, width = len(lengths), n_genes + 1
    starts = torch.arange(0, n_cells * width, width, device=device)
    flat = torch.repeat_interleave(starts, lengths, output_size=len(genes)) + genes.long()
    dense = torch.zeros(n_cells * width, dtype=torch.uint8, device=device)
    dense[flat] = moved["values"]
    dense = dense.view(n_cells, width)
    dense[:, -1] = APPENDED_TOKEN
    return {"tokens": dense, "label": moved["label"]}


def _read_columns(split: CellSplit | None) -> list[str]:
    columns = ["gene_idx", "value", "label", "fold"]
    return columns + [c for c in (split.columns if split else ()) if c not in columns]
