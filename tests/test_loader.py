"""From shards to model batches: the Ray-free transform, and the Ray Data pipeline."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from conftest import build_model, tiny_config

from scbert import tokenize
from scbert_platform.data.loader import (
    NO_LABEL,
    CellBatcher,
    EpochCache,
    ShardInfo,
    SparseShuffle,
    _scatter_on_device,
    cell_dataset,
    dense_batches,
    densify,
    gather,
    iter_local_batches,
    scatter_tokens,
    shard_files,
    sparse_tensors,
)
from scbert_platform.data.manifest import read_manifest


def dense_values(table: object, n_genes: int) -> np.ndarray:
    gene_idx = table.column("gene_idx").to_pylist()  # type: ignore[attr-defined]
    values = table.column("value").to_pylist()  # type: ignore[attr-defined]
    rows = np.repeat(np.arange(len(gene_idx)), [len(g) for g in gene_idx])
    flat_genes = np.concatenate(gene_idx).astype(np.int64)
    matrix = sp.csr_matrix((np.concatenate(values), (rows, flat_genes)), (len(gene_idx), n_genes))
    return matrix.toarray()


@pytest.mark.parametrize("n_bins", [5, 7])
def test_batcher_equals_tokenize_of_the_dense_values(pbmc_shards: Path, n_bins: int) -> None:
    info = ShardInfo.read(pbmc_shards)
    table = pq.read_table(shard_files(pbmc_shards)[0]).slice(0, 50)
    batch = CellBatcher(info.n_genes, n_bins, info.labels)(table)
    expected = tokenize(dense_values(table, info.n_genes), n_bins)
    assert batch["tokens"].dtype == np.uint8
    assert batch["tokens"].shape == (50, info.n_genes + 1)
    np.testing.assert_array_equal(batch["tokens"], expected.numpy())
    labels = [info.labels[i] for i in batch["label"]]
    assert labels == table.column("label").to_pylist()


def test_unknown_and_missing_labels_get_no_label_id() -> None:
    batcher = CellBatcher(3, 5, ["a", "b"])
    np.testing.assert_array_equal(batcher.encode_labels(["b", None, "z", "a"]), [1, -1, -1, 0])
    assert NO_LABEL == -1


def test_out_of_panel_index_and_oversized_bins_are_rejected() -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "gene_idx": pa.array([[0, 5]], pa.list_(pa.uint16())),
            "value": pa.array([[1.0, 2.0]], pa.list_(pa.float32())),
            "label": pa.array([None], pa.string()),
        }
    )
    with pytest.raises(ValueError, match="outside a panel of 3"):
        CellBatcher(3, 5)(table)
    with pytest.raises(ValueError, match="does not fit"):
        CellBatcher(3, 300)


def test_model_takes_the_compact_tokens() -> None:
    model = build_model(tiny_config()).eval()
    tokens = torch.randint(0, 6, (3, 25))
    with torch.inference_mode():
        wide = model(tokens)
        compact = model(tokens.to(torch.uint8))
    torch.testing.assert_close(compact, wide, rtol=0, atol=0)
    with pytest.raises(TypeError, match="integer"):
        model(tokens.float())


def test_local_batches_split_by_fold(pbmc_shards: Path) -> None:
    counts = read_manifest(pbmc_shards)["folds"]["counts"]
    held_out = sum(len(b["label"]) for b in iter_local_batches(pbmc_shards, 5, folds=[2]))
    rest = sum(len(b["label"]) for b in iter_local_batches(pbmc_shards, 5, exclude_folds=[2]))
    assert held_out == counts["2"]
    assert held_out + rest == sum(counts.values())


def rows_of(batches: object) -> list[tuple[int, bytes]]:
    """Every cell of the batches as (label, token bytes), sorted: the cells, whatever order."""
    rows = []
    for batch in batches:  # type: ignore[attr-defined]
        tokens, labels = np.asarray(batch["tokens"]), np.asarray(batch["label"])
        rows += [(int(y), t.tobytes()) for y, t in zip(labels, tokens, strict=True)]
    return sorted(rows)


@pytest.mark.ray
def test_ray_pipeline_gives_the_local_loaders_cells(ray_local: object, pbmc_shards: Path) -> None:
    """Sparse rows through Ray Data, shuffled and densified on the consumer: the same cells,
    tokens and labels as the local (dense, file-order) loader, per fold."""
    info = ShardInfo.read(pbmc_shards)
    counts = read_manifest(pbmc_shards)["folds"]["counts"]
    train = cell_dataset(pbmc_shards, 5, exclude_folds=[0])
    valid = cell_dataset(pbmc_shards, 5, folds=[0])
    batches = list(dense_batches(valid, info.n_genes, batch_size=64, shuffle_buffer=256, seed=1))
    for batch in batches:
        assert batch["tokens"].dtype == torch.uint8 and batch["label"].dtype == torch.int64
        assert batch["tokens"].shape[1] == info.n_genes + 1
        assert (batch["tokens"][:, -1] == 0).all()
    assert [len(b["label"]) for b in batches[:-1]] == [64] * (len(batches) - 1)
    assert sum(len(b["label"]) for b in batches) == counts["0"]
    assert rows_of(batches) == rows_of(iter_local_batches(pbmc_shards, 5, folds=[0]))
    assert train.count() == sum(counts.values()) - counts["0"]

    # the training worker's epoch cache: the second pass replays the first's blocks (no Ray
    # Data run), reshuffled by its seed; too small a cache keeps nothing and reads again
    cached = EpochCache(valid, max_bytes=2**20)
    first = list(dense_batches(cached, info.n_genes, batch_size=64, shuffle_buffer=256, seed=1))
    assert cached.blocks is not None and rows_of(first) == rows_of(batches)
    again = list(dense_batches(cached, info.n_genes, batch_size=64, shuffle_buffer=256, seed=2))
    assert rows_of(again) == rows_of(batches)
    assert [b["label"].tolist() for b in again] != [b["label"].tolist() for b in first]
    tiny = EpochCache(valid, max_bytes=100)
    assert rows_of(dense_batches(tiny, info.n_genes, batch_size=64)) == rows_of(batches)
    assert tiny.blocks is None and tiny.too_big


def sparse_block(first: int, n: int) -> tuple[np.ndarray, ...]:
    """n cells whose labels are first..first+n-1 and whose row i holds gene i % 7 (token 1+i%3)."""
    labels = np.arange(first, first + n)
    offsets = np.arange(n + 1)
    return offsets, labels % 7, (1 + labels % 3).astype(np.uint8), labels


def test_sparse_shuffle_draws_every_cell_once_from_its_buffer() -> None:
    blocks = [sparse_block(0, 100), sparse_block(100, 50), sparse_block(150, 130)]
    plain = [gather(d) for d in SparseShuffle(32, 0, seed=0).draws(iter(blocks))]
    assert np.concatenate([b[3] for b in plain]).tolist() == list(range(280))
    shuffled = [gather(d) for d in SparseShuffle(32, 64, seed=0).draws(iter(blocks))]
    labels = np.concatenate([b[3] for b in shuffled])
    assert sorted(labels.tolist()) == list(range(280)) and labels.tolist() != list(range(280))
    assert [len(b[3]) for b in shuffled] == [32] * 8 + [24]
    # the first batch is drawn once the buffer holds 64 + 32 cells: the first block's 100
    assert int(shuffled[0][3].max()) < 100
    for offsets, genes, tokens, y in shuffled:  # each row kept its own genes and tokens
        assert np.diff(offsets).tolist() == [1] * len(y)
        assert (genes == y % 7).all() and (tokens == 1 + y % 3).all()
    again = [gather(d) for d in SparseShuffle(32, 64, seed=0).draws(iter(blocks))]
    assert all((a[3] == b[3]).all() for a, b in zip(shuffled, again, strict=True))
    for draw in SparseShuffle(32, 64, seed=0).draws(iter(blocks)):  # the CPU path's scatter
        offsets, genes, tokens, labels = gather(draw)
        dense = densify(draw, 7)
        expected = scatter_tokens(offsets, genes, tokens, 7, dtype=np.uint8)
        np.testing.assert_array_equal(dense["tokens"].numpy(), expected)
        np.testing.assert_array_equal(dense["label"].numpy(), labels)


def test_device_scatter_equals_the_numpy_scatter(pbmc_shards: Path) -> None:
    """The GPU path (pinned sparse rows -> scatter on the device), run here on the CPU."""
    info = ShardInfo.read(pbmc_shards)
    batcher = CellBatcher(info.n_genes, 5, info.labels)
    table = pq.read_table(shard_files(pbmc_shards)[0]).slice(0, 40)
    offsets, genes, tokens = batcher.binned(table)
    labels = batcher.encode_labels(table.column("label").to_pylist())
    expected = scatter_tokens(offsets, genes, tokens, info.n_genes, dtype=np.uint8)
    np.testing.assert_array_equal(expected, batcher(table)["tokens"])
    sparse = sparse_tensors((offsets, genes, tokens, labels), pin=torch.cuda.is_available())
    dense = _scatter_on_device(sparse, info.n_genes, torch.device("cpu"))
    np.testing.assert_array_equal(dense["tokens"].numpy(), expected)
    np.testing.assert_array_equal(dense["label"].numpy(), labels)


@pytest.mark.ray
def test_streaming_split_gives_each_worker_a_disjoint_part(
    ray_local: object, pbmc_shards: Path
) -> None:
    """What Ray Train's get_dataset_shard does per worker: disjoint parts covering the data."""
    dataset = cell_dataset(pbmc_shards, 5)
    parts = dataset.streaming_split(2, equal=False)
    totals = [0, 0]
    label_sums = [0, 0]

    def consume(i: int) -> None:
        for batch in parts[i].iter_batches(batch_size=32):
            totals[i] += len(batch["label"])
            label_sums[i] += int(batch["label"].sum())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(totals) == read_manifest(pbmc_shards)["cells"]["kept"]
    all_labels = np.concatenate([b["label"] for b in iter_local_batches(pbmc_shards, 5)])
    assert sum(label_sums) == int(all_labels.sum())


def test_prefetching_reader_gives_the_same_batches_and_stops_cleanly(pbmc_shards: Path) -> None:
    plain = list(iter_local_batches(pbmc_shards, 5, batch_size=100, read_ahead=0))
    ahead = list(iter_local_batches(pbmc_shards, 5, batch_size=100, read_ahead=2))
    assert len(plain) == len(ahead) > 2
    for a, b in zip(plain, ahead, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["label"], b["label"])
    batches = iter_local_batches(pbmc_shards, 5, batch_size=10, read_ahead=1)
    next(batches)
    batches.close()  # the consumer stops early: the reader thread must end too
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_reader_errors_reach_the_consumer() -> None:
    from scbert_platform.data.loader import prefetch

    def failing() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    items = prefetch(failing(), 2)
    assert next(items) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(items)


def test_a_stalled_source_times_out_with_the_message() -> None:
    import time

    from scbert_platform.train.loop import with_timeout

    def stalled() -> Iterator[int]:
        yield 1
        time.sleep(5)
        yield 2

    items = with_timeout(stalled(), 0.3, "pipeline stalled: lower train.cpus_per_worker")
    assert next(items) == 1
    with pytest.raises(TimeoutError, match=r"lower train\.cpus_per_worker"):
        next(items)
