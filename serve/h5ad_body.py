"""An ``.h5ad`` request body: checked by its declared structure before any array is read.

An HDF5 dataset declares its shape, dtype and chunking apart from the bytes it stores, so a
few megabytes of body can declare a 5,000 x 200,000 dense ``X`` of unallocated (or compressed
zero) chunks that decodes to gigabytes, and ``anndata.read_h5ad`` reads every element of a
file (``layers``, ``obsm``, ``uns``, ``raw``...). Here the body is opened with h5py, which reads
metadata only; the elements the service uses (``X`` and the ``obs`` / ``var`` names) are
checked against ``BodyLimits``; only then are those arrays read (``X`` by anndata's
``read_elem``). Nothing else in the file is ever read.

Refused, each as a ``RequestError`` naming the element or the limit: not HDF5 (400); ``X``,
``obs`` or ``var`` missing (422 ``invalid_h5ad``); links (external or soft), virtual datasets,
external storage, ``X`` not of numbers or of an encoding other than a dense array, csr_matrix
or csc_matrix (422 ``unsupported_h5ad``); inconsistent shapes (422 ``invalid_h5ad``); more
cells or genes than allowed, more decoded bytes than allowed, or more decoded bytes per stored
byte than ``MAX_RATIO`` (413).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import h5py

from scbert_serve.schema import BodyLimits, RequestError

# Decoded bytes per stored byte of the arrays read, above which a body is refused: the work a
# request buys stays proportional to what it sent. Count matrices compress 2-20x with gzip;
# only unallocated chunks or long runs of zeros (a dense X of a very sparse matrix: send it
# as csr_matrix) go past 100x.
MAX_RATIO = 100
RATIO_FREE_BYTES = 16 * 2**20  # bodies decoding to less than this are not held to MAX_RATIO
NAME_BYTES = 64  # a variable-length name read as a Python str: ~50 bytes of object + its text
SPARSE_MAJOR = {"csr_matrix": 0, "csc_matrix": 1}  # encoding -> the axis indptr runs along
LEGACY_SPARSE = {"csr": "csr_matrix", "csc": "csc_matrix"}  # anndata < 0.7: h5sparse_format


@dataclass(frozen=True)
class Layout:
    """What a body declares: ``X``'s encoding, (cells, genes) and datasets; the names' datasets
    (a legacy compound ``obs`` / ``var`` keeps them in its ``index`` field)."""

    encoding: str  # "array", "csr_matrix" or "csc_matrix"
    shape: tuple[int, int]
    arrays: tuple[h5py.Dataset, ...]
    obs_names: h5py.Dataset
    var_names: h5py.Dataset


def check_h5ad(file: str | Path | BinaryIO, limits: BodyLimits) -> None:
    """Refuse (``RequestError``) a body whose declared structure breaks a rule or a limit.
    Reads HDF5 metadata only: no array of the body is decoded."""
    with _opened(file) as h5:
        _layout(h5, limits)


def read_h5ad(file: str | Path | BinaryIO, limits: BodyLimits) -> tuple[Any, list[str], list[str]]:
    """(cells x genes counts, gene names, cell ids) of a body that passes ``check_h5ad``."""
    from anndata.io import read_elem

    with _opened(file) as h5:
        layout = _layout(h5, limits)
        x = h5["X"]
        try:
            counts = read_elem(x)
            if layout.encoding != "array":
                counts.check_format(full_check=True)  # indices in range, indptr monotonic
            names = _names(layout.var_names), _names(layout.obs_names)
        except Exception as err:  # the client's bytes, decoded by h5py, anndata and scipy
            raise RequestError(
                422, "invalid_h5ad", f"X or its names could not be read: {err}"
            ) from None
    if tuple(counts.shape) != layout.shape:
        raise RequestError(422, "invalid_h5ad", f"X read as {counts.shape}, not {layout.shape}")
    return counts, *names


@contextmanager
def _opened(file: str | Path | BinaryIO) -> Iterator[h5py.File]:
    try:
        h5 = h5py.File(file, "r", locking=False)
    except (OSError, ValueError) as err:
        raise RequestError(
            400, "malformed_h5ad", f"the body is not a readable .h5ad (HDF5) file: {err}"
        ) from None
    try:
        yield h5
    except RequestError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as err:  # corrupt metadata
        raise RequestError(400, "malformed_h5ad", f"the .h5ad cannot be read: {err}") from None
    finally:
        h5.close()


def _layout(h5: h5py.File, limits: BodyLimits) -> Layout:
    x = _member(h5, "X", "the counts matrix")
    obs, var = _member(h5, "obs", "the cell ids"), _member(h5, "var", "the gene names")
    encoding, shape, arrays = _dense(x) if isinstance(x, h5py.Dataset) else _sparse(x)
    limits.check_cells(shape[0])
    limits.check_genes(shape[1])
    layout = Layout(encoding, shape, arrays, _index(obs, shape[0]), _index(var, shape[1]))
    _check_decoded(layout, limits)
    return layout


def _member(group: h5py.Group, name: str, what: str) -> Any:
    """``group[name]``, present and stored in this file (no link elsewhere)."""
    path = f"{group.name.rstrip('/')}/{name}".lstrip("/")
    link = group.get(name, getlink=True)
    if link is None:
        raise RequestError(422, "invalid_h5ad", f"the .h5ad has no {path!r} ({what})")
    if isinstance(link, h5py.ExternalLink):
        raise RequestError(
            422,
            "unsupported_h5ad",
            f"{path!r} is an external link (to {link.filename}): a body must hold its own data",
        )
    if isinstance(link, h5py.SoftLink):
        raise RequestError(422, "unsupported_h5ad", f"{path!r} is a soft link: store it in place")
    member = group[name]
    if isinstance(member, h5py.Dataset):
        _check_storage(member, path)
    elif not isinstance(member, h5py.Group):
        raise RequestError(422, "invalid_h5ad", f"{path!r} is neither a dataset nor a group")
    return member


def _check_storage(dataset: h5py.Dataset, path: str) -> None:
    if dataset.is_virtual:
        raise RequestError(
            422, "unsupported_h5ad", f"{path!r} is a virtual dataset (it maps other files)"
        )
    if dataset.external:
        raise RequestError(422, "unsupported_h5ad", f"{path!r} keeps its data in external files")


def _dense(x: h5py.Dataset) -> tuple[str, tuple[int, int], tuple[h5py.Dataset, ...]]:
    encoding = _text_attr(x, "encoding-type") or "array"
    if encoding != "array":
        raise RequestError(422, "unsupported_h5ad", f"X is a dataset of encoding {encoding!r}")
    if x.ndim != 2:
        raise RequestError(422, "invalid_h5ad", f"X has {x.ndim} dimensions: cells x genes is 2")
    _check_numbers(x, "X")
    return encoding, (int(x.shape[0]), int(x.shape[1])), (x,)


def _sparse(x: h5py.Group) -> tuple[str, tuple[int, int], tuple[h5py.Dataset, ...]]:
    legacy = LEGACY_SPARSE.get(_text_attr(x, "h5sparse_format") or "")
    encoding = _text_attr(x, "encoding-type") or legacy or ""
    if encoding not in SPARSE_MAJOR:
        raise RequestError(
            422,
            "unsupported_h5ad",
            f"X is a group of encoding {encoding!r}; X is read as a dense array, a csr_matrix "
            "or a csc_matrix",
        )
    shape = _shape_attr(x, "h5sparse_shape" if legacy and "shape" not in x.attrs else "shape")
    data, indices, indptr = (_member(x, n, "part of the sparse X") for n in _PARTS)
    for part, name in zip((data, indices, indptr), _PARTS, strict=True):
        if not isinstance(part, h5py.Dataset) or part.ndim != 1:
            raise RequestError(422, "invalid_h5ad", f"X/{name} is not a 1-d dataset")
    _check_numbers(data, "X/data")
    _check_numbers(indices, "X/indices", kinds="iu")
    _check_numbers(indptr, "X/indptr", kinds="iu")
    nnz, major = len(data), shape[SPARSE_MAJOR[encoding]]
    if len(indices) != nnz or len(indptr) != major + 1:
        raise RequestError(
            422,
            "invalid_h5ad",
            f"X ({encoding} of shape {shape}) has {nnz} values, {len(indices)} indices and "
            f"{len(indptr)} indptr entries (needs as many indices as values, {major + 1} indptr)",
        )
    if nnz > shape[0] * shape[1]:
        raise RequestError(
            422, "invalid_h5ad", f"X stores {nnz} values for {shape[0]} x {shape[1]} entries"
        )
    return encoding, shape, (data, indices, indptr)


_PARTS = ("data", "indices", "indptr")


def _check_numbers(dataset: h5py.Dataset, path: str, kinds: str = "iuf") -> None:
    """Integers (or floats of 2, 4 or 8 bytes): what scipy.sparse and the count checks take."""
    dtype = dataset.dtype
    if dtype.kind not in kinds or (dtype.kind == "f" and dtype.itemsize not in (2, 4, 8)):
        wanted = "integers" if kinds == "iu" else "numbers (integers or floats)"
        held = "text" if h5py.check_string_dtype(dtype) is not None else f"type {dtype}"
        raise RequestError(422, "unsupported_h5ad", f"{path} holds {held}; it must hold {wanted}")


def _shape_attr(x: h5py.Group, name: str) -> tuple[int, int]:
    value = x.attrs.get(name)
    shape = getattr(value, "shape", None)
    kind = getattr(getattr(value, "dtype", None), "kind", "")
    if shape != (2,) or kind not in ("i", "u") or min(value) < 0:
        raise RequestError(
            422, "invalid_h5ad", f"X's {name!r} attribute is {value!r}, not 2 integers >= 0"
        )
    return int(value[0]), int(value[1])


def _index(frame: Any, n: int) -> h5py.Dataset:
    """The names dataset of ``obs`` / ``var`` (a dataframe group, or a legacy compound dataset
    with an ``index`` field), with one name per cell / gene."""
    path = frame.name.lstrip("/")
    if isinstance(frame, h5py.Dataset):
        field = (frame.dtype.fields or {}).get("index")
        if field is None or field[0].kind not in "SO" or frame.ndim != 1:
            raise RequestError(
                422, "invalid_h5ad", f"{path!r} is a dataset without an 'index' field of names"
            )
        names = frame
    else:
        key = _text_attr(frame, "_index")
        if not key or "/" in key or key in (".", ".."):
            raise RequestError(
                422, "invalid_h5ad", f"{path!r} has no '_index' attribute naming its names"
            )
        names = _member(frame, key, "the names")
        if not isinstance(names, h5py.Dataset) or h5py.check_string_dtype(names.dtype) is None:
            raise RequestError(422, "unsupported_h5ad", f"{path}/{key} is not an array of text")
    if names.shape != (n,):
        raise RequestError(
            422, "invalid_h5ad", f"X has {n} {_AXIS[path]} but {path!r} names {names.shape}"
        )
    return names


_AXIS = {"obs": "cells", "var": "genes"}


def _names(dataset: h5py.Dataset) -> list[str]:
    if dataset.dtype.fields:
        values = dataset.fields("index")[()]
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return [str(v) for v in dataset.asstr()[()]]


def _check_decoded(layout: Layout, limits: BodyLimits) -> None:
    """What reading ``layout`` decodes (each array and one chunk buffer of it) within
    ``serve.max_decoded_mb``, and at most ``MAX_RATIO`` times the bytes it has stored."""
    datasets = (*layout.arrays, layout.obs_names, layout.var_names)
    decoded = sum(_decoded_bytes(d) for d in datasets)
    rows, columns = layout.shape
    limits.check_decoded(
        decoded, f"X ({layout.encoding} of {rows} x {columns}) and its names, a chunk each,"
    )
    stored = sum(d.id.get_storage_size() for d in datasets)
    if decoded > RATIO_FREE_BYTES and decoded > MAX_RATIO * stored:
        raise RequestError(
            413,
            "compression_ratio_too_high",
            f"X and its names decode to {decoded / 2**20:.1f} MiB from {stored} stored bytes "
            f"({decoded / max(stored, 1):.0f}x); above {RATIO_FREE_BYTES // 2**20} MiB the "
            f"limit is {MAX_RATIO}x: send X as a sparse csr_matrix, with its chunks written",
        )


def _decoded_bytes(dataset: h5py.Dataset) -> int:
    """The array and, for a chunked dataset, one decoded chunk (HDF5 inflates whole chunks,
    and a chunk may be declared larger than its dataset)."""
    dtype = dataset.dtype
    itemsize = NAME_BYTES if h5py.check_vlen_dtype(dtype) is not None else int(dtype.itemsize)
    chunk = math.prod(dataset.chunks) if dataset.chunks else 0
    return int(math.prod(dataset.shape) + chunk) * itemsize


def _text_attr(obj: Any, name: str) -> str | None:
    value = obj.attrs.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None
