"""The ``.h5ad`` body checker without Ray: files anndata writes (and its pre-0.7 layout) read as
anndata reads them; crafted bodies refused by their declared structure, each with the code and
the limit it breaks; and the memory a refusal and a read cost, measured in a fresh process.

``Crafted`` writes an ``.h5ad`` straight with h5py (declared shapes, dtypes, chunks and links
that anndata would never write); tests/test_serve.py posts the same bodies to the service.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from scbert_platform.params import ServeParams
from scbert_serve.h5ad_body import MAX_RATIO, check_h5ad, read_h5ad
from scbert_serve.schema import BodyLimits, RequestError

LIMITS = BodyLimits.of(ServeParams())  # the defaults: 5000 cells, 100000 genes, 512 MiB


@dataclass(frozen=True)
class Crafted:
    """An ``.h5ad`` body written with h5py: ``X`` (dense or sparse) and the obs / var names,
    then ``edits`` (names from ``EDITS``) applied to the open file."""

    n_cells: int = 3
    n_genes: int = 4
    encoding: str = "array"  # array | csr_matrix | csc_matrix
    dtype: str = "float32"  # of X's values: a numpy dtype, or "str" (variable-length text)
    nnz: int | None = None  # sparse: stored values (default: min(n_cells, n_genes))
    written: bool = True  # False: every array declared (chunked), its chunks never allocated
    zeros: bool = False  # X's values all 0 (compress to almost nothing)
    compression: str | None = "gzip"
    chunks: Any = True  # h5py's chunks argument for X's arrays when written
    maxshape: Any = None  # h5py's maxshape for X's arrays when written (chunks may exceed X)
    edits: tuple[str, ...] = ()
    genes: tuple[str, ...] = ()  # the first gene names (then g<i>)
    seed: int = 0
    cut: int | None = None  # the body cut off after this many bytes

    def body(self) -> bytes:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5:
            if self.encoding == "array":
                self._array(h5, "X", (self.n_cells, self.n_genes), self._dtype())
                h5["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            else:
                self._sparse(h5)
            extra = (f"g{i}" for i in range(len(self.genes), self.n_genes))
            self._names(h5, "obs", [f"c{i}" for i in range(self.n_cells)])
            self._names(h5, "var", [*self.genes[: self.n_genes], *extra])
            for edit in self.edits:  # one that does not fit this layout is left out
                with contextlib.suppress(AttributeError, KeyError, OSError, TypeError, ValueError):
                    EDITS[edit](h5)
        return buffer.getvalue()[: self.cut]

    def _dtype(self) -> Any:
        return h5py.string_dtype() if self.dtype == "str" else np.dtype(self.dtype)

    def _array(
        self, group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, values: Any = None
    ) -> None:
        if not self.written:
            square = len(shape) == 2 and self.chunks not in (None, False)
            group.create_dataset(
                name,
                shape=shape,
                dtype=dtype,
                chunks=self.chunks if square else True,
                maxshape=self.maxshape if square else None,
                compression=self.compression,
            )
            return
        if values is None:
            values = np.random.default_rng(self.seed).integers(1, 5, shape) * (not self.zeros)
            values = values.astype(str).astype(object) if self.dtype == "str" else values
        chunks = self.chunks if values.ndim == 2 or self.chunks in (True, None) else True
        group.create_dataset(
            name,
            data=np.asarray(values, dtype=dtype),
            chunks=chunks,
            maxshape=self.maxshape if values.ndim == 2 else None,
            compression=self.compression if chunks else None,
        )

    def _sparse(self, h5: h5py.File) -> None:
        x = h5.create_group("X")
        shape = (self.n_cells, self.n_genes)
        x.attrs.update({"encoding-type": self.encoding, "encoding-version": "0.1.0"})
        x.attrs["shape"] = shape
        major, minor = shape if self.encoding == "csr_matrix" else shape[::-1]
        nnz = min(major, minor) if self.nnz is None else self.nnz
        flat = np.zeros(0, np.int64)
        if self.written:  # nnz distinct entries, in order
            nnz = min(nnz, major * minor)
            flat = np.random.default_rng(self.seed).choice(major * minor, nnz, replace=False)
            flat = np.sort(flat)
        self._array(x, "data", (nnz,), self._dtype())
        self._array(x, "indices", (nnz,), np.int32, flat % max(minor, 1))
        self._array(
            x,
            "indptr",
            (major + 1,),
            np.int64,
            np.searchsorted(flat // max(minor, 1), np.arange(major + 1)),
        )

    def _names(self, h5: h5py.File, key: str, names: list[str]) -> None:
        frame = h5.create_group(key)
        frame.attrs.update(
            {"_index": "_index", "encoding-type": "dataframe", "encoding-version": "0.2.0"}
        )
        frame.attrs["column-order"] = np.array([], dtype=h5py.string_dtype())
        if self.written:
            text = np.array(names, dtype=object)
            index = frame.create_dataset("_index", data=text, dtype=h5py.string_dtype())
        else:  # fixed-length text declared, its chunks never allocated
            index = frame.create_dataset(
                "_index",
                shape=(len(names),),
                dtype="S16",
                chunks=(max(1, min(len(names), 4096)),),
                maxshape=(None,),
                compression="gzip",
            )
        index.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def _read(h5: h5py.File, path: str) -> np.ndarray:
    """A dataset's values, for an edit of a small body (a huge one is declared, not written)."""
    if h5[path].size > 10**6:
        raise ValueError(f"{path} is too large to edit")
    return np.asarray(h5[path][()])


def _replace(h5: h5py.File, path: str, **dataset: Any) -> None:
    attrs = dict(h5[path].attrs) if path in h5 else {}
    del h5[path]
    h5.create_dataset(path, **dataset).attrs.update(attrs)


def _move_x(h5: h5py.File, link: Any) -> None:
    h5.move("X", "counts")
    h5["X"] = link


def _virtual_x(h5: h5py.File) -> None:
    shape = h5["X"].shape
    layout = h5py.VirtualLayout(shape=shape, dtype="float32")
    layout[:] = h5py.VirtualSource("/tmp/elsewhere.h5", "X", shape=shape)
    del h5["X"]
    h5.create_virtual_dataset("X", layout, fillvalue=1)


EDITS: dict[str, Any] = {
    **{
        f"drop {path}": (lambda h5, path=path: h5.__delitem__(path))
        for path in ("X", "obs", "var", "obs/_index", "var/_index", "X/data", "X/indptr")
    },
    "X external link": lambda h5: _move_x(h5, h5py.ExternalLink("/etc/hostname", "/X")),
    "X soft link": lambda h5: _move_x(h5, h5py.SoftLink("/counts")),
    "X external link to bytes": lambda h5: _move_x(h5, h5py.ExternalLink(b"/etc/\xff", "/X")),
    "X virtual": _virtual_x,
    "X external storage": lambda h5: _replace(
        h5, "X", shape=h5["X"].shape, dtype="uint8", external=[("/etc/hostname", 0, 2**20)]
    ),
    "X 3-d": lambda h5: _replace(h5, "X", data=np.ones((2, 2, 2))),
    "X encoding dict": lambda h5: h5["X"].attrs.__setitem__("encoding-type", "dict"),
    "X shape text": lambda h5: h5["X"].attrs.__setitem__("shape", "3 x 4"),
    "X float indices": lambda h5: _replace(
        h5, "X/indices", data=_read(h5, "X/indices").astype(np.float64)
    ),
    "X indices out of range": lambda h5: _replace(
        h5, "X/indices", data=_read(h5, "X/indices") + 10**6
    ),
    "var one name short": lambda h5: _replace(
        h5, "var/_index", data=_read(h5, "var/_index")[1:], dtype=h5py.string_dtype()
    ),
    "var names numbers": lambda h5: _replace(
        h5, "var/_index", data=np.arange(len(h5["var/_index"]))
    ),
    "obs index elsewhere": lambda h5: h5["obs"].attrs.__setitem__("_index", "/X"),
}


DTYPES = ["float32", "float64", "int32", "uint16", "int8", ">f4", "float16", "bool", "complex64"]


def crafted_bodies(genes: tuple[str, ...] = (), *, max_cells: int = 40) -> Any:
    """A hypothesis strategy of ``Crafted`` bodies: small ones written in full, with any dtype,
    layout, compression and edits; and huge ones declared only (up to 10^6 x 10^6, 10^10
    stored values)."""
    from hypothesis import strategies as st

    def layouts(cells: Any, genes_: Any, nnz: Any, written: Any) -> Any:
        return st.builds(
            Crafted,
            n_cells=cells,
            n_genes=genes_,
            encoding=st.sampled_from(["array", "csr_matrix", "csc_matrix"]),
            dtype=st.sampled_from([*DTYPES, "str"]),
            nnz=st.none() | nnz,
            written=written,
            zeros=st.booleans(),
            compression=st.sampled_from([None, "gzip", "lzf"]),
            chunks=st.sampled_from([True, None]),
            edits=st.lists(st.sampled_from(list(EDITS)), max_size=2, unique=True).map(tuple),
            genes=st.just(genes),
            seed=st.integers(0, 3),
            cut=st.none() | st.none() | st.integers(0, 200_000),
        )

    small = layouts(
        st.integers(0, max_cells), st.integers(0, 60), st.integers(0, 200), st.booleans()
    )
    huge = layouts(
        st.integers(0, 10**6) | st.integers(0, max_cells),
        st.integers(0, 10**6) | st.sampled_from([100_000, 100_001]),
        st.integers(0, 10**10),
        st.just(False),
    )
    return st.one_of(small, small, huge)


def refusal(body: bytes, limits: BodyLimits = LIMITS, *, read: bool = False) -> RequestError:
    with pytest.raises(RequestError) as refused:
        (read_h5ad if read else check_h5ad)(io.BytesIO(body), limits)
    return refused.value


# --- what anndata writes reads as anndata reads it ----------------------------------------------


@pytest.mark.parametrize("layout", ["csr", "csc", "dense-gzip", "crafted-csr", "crafted-dense"])
def test_h5ad_files_read_as_anndata_reads_them(layout: str, tmp_path: Path) -> None:
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, (30, 50)).astype(np.float32)
    path = tmp_path / "cells.h5ad"
    if layout.startswith("crafted"):
        encoding = "csr_matrix" if layout == "crafted-csr" else "array"
        path.write_bytes(Crafted(n_cells=30, n_genes=50, encoding=encoding, nnz=200).body())
    else:
        adata = anndata.AnnData(
            {"csr": sp.csr_matrix, "csc": sp.csc_matrix}.get(layout, np.asarray)(counts)
        )
        adata.obs_names = [f"cell-{i}" for i in range(30)]
        adata.var_names = [f"GENE{i}" for i in range(50)]
        adata.layers["big"] = np.ones((30, 50))  # never read
        adata.write_h5ad(path, compression="gzip" if layout == "dense-gzip" else None)
    expected = anndata.read_h5ad(path)
    check_h5ad(path, LIMITS)
    x, genes, ids = read_h5ad(io.BytesIO(path.read_bytes()), LIMITS)
    assert genes == list(expected.var_names) and ids == list(expected.obs_names)
    dense = x.toarray() if sp.issparse(x) else x
    expected_x = expected.X.toarray() if sp.issparse(expected.X) else expected.X
    np.testing.assert_array_equal(dense, expected_x)


def test_the_bundled_pre_0_7_h5ad_reads_as_anndata_reads_it(pbmc_h5ad: Path) -> None:
    """scanpy's pbmc68k file: compound obs / var datasets, a dense X without attributes."""
    import anndata

    expected = anndata.read_h5ad(pbmc_h5ad)
    x, genes, ids = read_h5ad(pbmc_h5ad, LIMITS)
    assert genes == list(expected.var_names) and ids == list(expected.obs_names)
    np.testing.assert_array_equal(x, expected.X)


# --- refusals by declared structure ---------------------------------------------------------------

HUGE_DENSE = Crafted(n_cells=5000, n_genes=200_000, written=False)  # 3.7 GiB of float32
HUGE_DECODED = Crafted(n_cells=5000, n_genes=100_000, dtype="float64", written=False)
HUGE_SPARSE = Crafted(
    n_cells=5000, n_genes=100_000, encoding="csr_matrix", nnz=200_000_000, written=False
)
CSR = Crafted(encoding="csr_matrix")

# case: (body, status, code, a fragment of the message)
REFUSED: dict[str, tuple[Crafted | bytes, int, str, str]] = {
    "not HDF5": (b"not hdf5 at all", 400, "malformed_h5ad", "not a readable .h5ad"),
    "empty body": (b"", 400, "malformed_h5ad", "not a readable .h5ad"),
    "no X": (Crafted(edits=("drop X",)), 422, "invalid_h5ad", "no 'X' (the counts matrix)"),
    "no obs": (Crafted(edits=("drop obs",)), 422, "invalid_h5ad", "no 'obs' (the cell ids)"),
    "no var": (Crafted(edits=("drop var",)), 422, "invalid_h5ad", "no 'var' (the gene names)"),
    "no var names": (Crafted(edits=("drop var/_index",)), 422, "invalid_h5ad", "'var/_index'"),
    "no X/indptr": (replace(CSR, edits=("drop X/indptr",)), 422, "invalid_h5ad", "'X/indptr'"),
    "too many cells": (
        Crafted(n_cells=6000, written=False),
        413,
        "too_many_cells",
        "6000 cells in one request; the limit is serve.max_cells_per_request = 5000",
    ),
    "too many genes": (
        HUGE_DENSE,
        413,
        "too_many_genes",
        "200000 genes in one request; the limit is serve.max_genes = 100000",
    ),
    "huge declared dense X": (
        HUGE_DECODED,
        413,
        "too_large_decoded",
        "5000 x 100000) and its names, a chunk each, decode to 38",
    ),
    "huge sparse nnz": (HUGE_SPARSE, 413, "too_large_decoded", "serve.max_decoded_mb = 512"),
    "a chunk larger than X": (
        Crafted(chunks=(20_000, 10_000), maxshape=(None, None), written=False),
        413,
        "too_large_decoded",
        "(array of 3 x 4) and its names, a chunk each, decode to 762.9 MiB",
    ),
    "unallocated chunks": (
        Crafted(n_cells=2000, n_genes=5000, written=False),
        413,
        "compression_ratio_too_high",
        f"the limit is {MAX_RATIO}x",
    ),
    "compressed zeros": (
        Crafted(n_cells=2000, n_genes=5000, zeros=True),
        413,
        "compression_ratio_too_high",
        f"the limit is {MAX_RATIO}x",
    ),
    "external link": (
        Crafted(edits=("X external link",)),
        422,
        "unsupported_h5ad",
        "'X' is an external link (to /etc/hostname)",
    ),
    "external link to a name of no UTF-8": (
        Crafted(edits=("X external link to bytes",)),
        422,
        "unsupported_h5ad",
        "(to /etc/\\udcff)",  # answered as text that UTF-8 can encode
    ),
    "soft link": (Crafted(edits=("X soft link",)), 422, "unsupported_h5ad", "soft link"),
    "virtual dataset": (Crafted(edits=("X virtual",)), 422, "unsupported_h5ad", "virtual"),
    "external storage": (
        Crafted(edits=("X external storage",)),
        422,
        "unsupported_h5ad",
        "'X' keeps its data in external files",
    ),
    "string X": (Crafted(dtype="str"), 422, "unsupported_h5ad", "X holds text"),
    "boolean X": (Crafted(dtype="bool"), 422, "unsupported_h5ad", "X holds type bool"),
    "complex X": (Crafted(dtype="complex64"), 422, "unsupported_h5ad", "type complex64"),
    "3-d X": (Crafted(edits=("X 3-d",)), 422, "invalid_h5ad", "X has 3 dimensions"),
    "X of another encoding": (
        replace(CSR, edits=("X encoding dict",)),
        422,
        "unsupported_h5ad",
        "X is a group of encoding 'dict'",
    ),
    "no shape": (
        replace(CSR, edits=("X shape text",)),
        422,
        "invalid_h5ad",
        "X's 'shape' attribute is '3 x 4'",
    ),
    "float indices": (
        replace(CSR, edits=("X float indices",)),
        422,
        "unsupported_h5ad",
        "X/indices holds type float64; it must hold integers",
    ),
    "more values than entries": (
        Crafted(encoding="csc_matrix", nnz=13, written=False),
        422,
        "invalid_h5ad",
        "X stores 13 values for 3 x 4 entries",
    ),
    "names of another length": (
        Crafted(edits=("var one name short",)),
        422,
        "invalid_h5ad",
        "X has 4 genes but 'var' names (3,)",
    ),
    "names not text": (
        Crafted(edits=("var names numbers",)),
        422,
        "unsupported_h5ad",
        "var/_index is not an array of text",
    ),
    "names elsewhere": (
        Crafted(edits=("obs index elsewhere",)),
        422,
        "invalid_h5ad",
        "'obs' has no '_index' attribute",
    ),
    "no cells": (Crafted(n_cells=0), 422, "no_cells", "the request has no cells"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_crafted_bodies_are_refused_before_any_array_is_read(case: str) -> None:
    body, status, code, fragment = REFUSED[case]
    refused = refusal(body if isinstance(body, bytes) else body.body())
    assert (refused.status, refused.code) == (status, code), refused.message
    assert fragment in refused.message


def test_indices_out_of_range_are_refused_when_read() -> None:
    body = replace(CSR, edits=("X indices out of range",)).body()
    check_h5ad(io.BytesIO(body), LIMITS)  # the declared structure is sound
    refused = refusal(body, read=True)
    assert (refused.status, refused.code) == (422, "invalid_h5ad")
    assert "X or its names could not be read" in refused.message


def test_fuzzed_bodies_are_read_or_refused_with_a_4xx() -> None:
    """Whatever the body declares, reading it ends in counts the service's count checks take
    (or refuse with an IngestError, a 422 there) or in a RequestError of 4xx; never another
    exception (a 500)."""
    from hypothesis import HealthCheck, example, given, settings

    from scbert_platform.data.errors import IngestError
    from scbert_platform.track.pyfunc import aligned_counts

    panel = [f"g{i}" for i in range(30)]
    limits = replace(LIMITS, max_decoded_bytes=8 * 2**20)
    outcomes: list[str] = []

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(crafted_bodies())
    @example(HUGE_DENSE)
    @example(HUGE_SPARSE)
    def check(case: Crafted) -> None:
        try:
            counts, genes, ids = read_h5ad(io.BytesIO(case.body()), limits)
            aligned_counts(counts, genes, panel, cell_ids=ids)
            outcomes.append("read")
        except RequestError as refused:
            assert 400 <= refused.status < 500 and refused.message
            outcomes.append(refused.code)
        except IngestError:
            outcomes.append("invalid_counts")

    check()
    seen = collections.Counter(outcomes)
    print(seen)
    assert {"read", "too_many_cells", "too_many_genes", "too_large_decoded"} <= set(seen)
    assert {"invalid_h5ad", "unsupported_h5ad", "invalid_counts", "malformed_h5ad"} <= set(seen)


def test_the_limits_are_the_serve_params() -> None:
    limits = BodyLimits.of(ServeParams(max_cells_per_request=10, max_genes=3, max_decoded_mb=0.5))
    assert limits == BodyLimits(max_cells=10, max_genes=3, max_decoded_bytes=2**19)
    assert refusal(Crafted().body(), limits).code == "too_many_genes"
    wide = Crafted(n_cells=10, n_genes=3, chunks=(2**16, 3), maxshape=(None, 3)).body()
    assert "serve.max_decoded_mb = 0.5" in refusal(wide, limits).message
    x, genes, ids = read_h5ad(io.BytesIO(Crafted(n_cells=10, n_genes=3).body()), limits)
    assert x.shape == (10, 3) and genes == ["g0", "g1", "g2"] and ids[-1] == "c9"


# --- memory: measured in a fresh process ---------------------------------------------------------

MEASURE = """
import io, json, re, resource, sys, tracemalloc
import anndata.io, h5py, numpy, scipy.sparse  # imported before the baseline
from scbert_serve.h5ad_body import read_h5ad
from scbert_serve.schema import BodyLimits, RequestError

def status(key):  # /proc/self/status: VmRSS (resident now), VmHWM (its peak)
    with open("/proc/self/status") as lines:
        return int(re.search(key + r":\\s+(\\d+) kB", lines.read())[1]) * 1024

limits = BodyLimits(**json.loads(sys.argv[1]))
read_h5ad(sys.argv[2], limits)  # warm-up: HDF5's and anndata's first-use allocations
with open(sys.argv[3], "rb") as handle:
    body = handle.read()
try:  # the peak reset to the resident memory now (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
except OSError:  # the peak so far stays: the rise measured is then an upper bound
    pass
baseline = status("VmRSS")
tracemalloc.start()
try:
    counts, genes, ids = read_h5ad(io.BytesIO(body), limits)
    outcome = "read"
    sparse = scipy.sparse.issparse(counts)
    arrays = [counts.data, counts.indices, counts.indptr] if sparse else [counts]
    decoded = sum(a.nbytes for a in arrays)
except RequestError as refused:
    outcome, decoded = refused.code, 0
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"outcome": outcome, "decoded": decoded, "traced_peak": traced,
                  "rss_peak_rise": status("VmHWM") - baseline, "body": len(body)}))
"""


def measured(body: bytes, tmp_path: Path) -> dict[str, Any]:
    """Reading ``body`` in a fresh Python: the outcome, the decoded X's bytes, the peak of
    Python's and numpy's allocations (tracemalloc) and the rise of the process's peak resident
    memory (VmHWM, which also sees HDF5's own buffers) over its resident memory before."""
    (tmp_path / "warm.h5ad").write_bytes(Crafted().body())
    (tmp_path / "body.h5ad").write_bytes(body)
    limits = json.dumps(LIMITS.__dict__)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            limits,
            str(tmp_path / "warm.h5ad"),
            str(tmp_path / "body.h5ad"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    print(body.__len__(), result)  # shown with -s: the figures for docs/reliability.md
    return result


def test_refusing_a_huge_declared_body_costs_megabytes_not_gigabytes(tmp_path: Path) -> None:
    """The body of the report: 7 MB of .h5ad declaring a 5,000 x 200,000 dense float32 X (3.7
    GiB) of gzip chunks, its first 10 rows written; a 3.7 GiB float64 X of 100,000 genes and a
    200 M non-zero CSR X (2.2 GiB), both refused by their decoded size."""
    buffer = io.BytesIO(HUGE_DENSE.body())
    with h5py.File(buffer, "r+") as h5:
        h5["X"][:10] = np.random.default_rng(0).random((10, 200_000), np.float32)
    bodies = {
        "too_many_genes": buffer.getvalue(),
        "too_large_decoded": HUGE_DECODED.body(),
        "too_large_decoded ": HUGE_SPARSE.body(),
    }
    for code, body in bodies.items():
        result = measured(body, tmp_path)
        assert result["outcome"] == code.strip()
        assert result["rss_peak_rise"] < 50 * 2**20 and result["traced_peak"] < 50 * 2**20


def test_reading_an_accepted_body_peaks_at_a_small_multiple_of_its_decoded_size(
    tmp_path: Path,
) -> None:
    body = Crafted(n_cells=2000, n_genes=20_000, encoding="csr_matrix", nnz=2_000_000).body()
    result = measured(body, tmp_path)
    assert result["outcome"] == "read" and result["decoded"] > 15 * 2**20
    assert result["rss_peak_rise"] < 3 * result["decoded"] + 20 * 2**20
    assert result["traced_peak"] < 3 * result["decoded"] + 20 * 2**20
