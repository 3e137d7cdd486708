"""Expression tokens: binning of log2(1 + x)-normalised values as in the published scBERT code.

A gene's token is ``min(v, n_bins)`` truncated to an integer, so tokens are 0..n_bins and bin 0 is
[0, 1) (it includes low non-zero values). ``n_bins + 1`` is the mask token; the vocabulary has
``n_bins + 2`` entries. One position is appended after the last gene, always token 0.

torch is imported where a tensor is made: binning numpy or scipy values (Ray Data's tasks, the
ingest) imports numpy only, and a Ray worker process that bins cells does not spend seconds of
CPU importing torch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

APPENDED_TOKEN = 0


def mask_token_id(n_bins: int) -> int:
    """Token that replaces masked positions in pretraining."""
    return n_bins + 1


def vocab_size(n_bins: int) -> int:
    """Number of token ids: bins 0..n_bins and the mask token."""
    return n_bins + 2


def _is_tensor(values: Any) -> bool:
    """Whether ``values`` is a torch tensor (without importing torch: if no module imported it,
    nothing could have made one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(values, torch.Tensor)


def _check_values(values: np.ndarray | torch.Tensor) -> None:
    if _is_tensor(values):
        finite = bool(values.isfinite().all())  # type: ignore[union-attr]
    else:
        finite = bool(np.isfinite(values).all())
    if not finite:
        raise ValueError("expression values contain NaN or inf; expected log2(1 + x) values")
    if (values < 0).any():
        raise ValueError(
            "expression values are negative; expected log2(1 + x) of normalised counts"
        )


def bin_values(values: Any, n_bins: int, *, dtype: Any = None) -> np.ndarray | torch.Tensor:
    """Bin log2(1 + x) values to tokens 0..n_bins (same shape; int64, or ``dtype`` for numpy).

    Accepts a numpy array, a torch tensor (dense or sparse) or a scipy sparse matrix; sparse input
    is densified. A numpy/scipy input gives a numpy array, a torch input a tensor.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if _is_tensor(values):
        import torch

        dense = values.to_dense() if values.is_sparse or values.layout != torch.strided else values
        _check_values(dense)
        return dense.clamp(max=n_bins).to(torch.int64)  # truncation toward zero, as .long()
    if hasattr(values, "tocoo"):  # scipy.sparse, duck-typed so that scbert needs no scipy
        coo = values.tocoo(copy=True)
        coo.sum_duplicates()  # repeated coordinates add up, as in scipy's toarray()
        _check_values(coo.data)
        out = np.zeros(coo.shape, dtype=dtype or np.int64)
        out[coo.row, coo.col] = np.minimum(coo.data, n_bins).astype(out.dtype)
        return out
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"expression values must be numeric, got dtype {array.dtype}")
    _check_values(array)
    return np.minimum(array, n_bins).astype(dtype or np.int64)  # truncation toward zero


def tokenize(values: Any, n_bins: int) -> torch.Tensor:
    """Model input from values of shape (n_cells, n_genes) or (n_genes,).

    Returns an int64 tensor (n_cells, n_genes + 1) (or (n_genes + 1,)): the binned values with the
    appended position (token 0) last.
    """
    import torch

    binned = torch.as_tensor(bin_values(values, n_bins))
    appended = torch.full((*binned.shape[:-1], 1), APPENDED_TOKEN, dtype=torch.int64)
    return torch.cat([binned, appended], dim=-1)
