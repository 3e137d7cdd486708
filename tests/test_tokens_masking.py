"""Binning and masking exactly as the published scBERT code does them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scbert import (
    IGNORE_INDEX,
    ScBertConfig,
    bin_values,
    drop_genes,
    mask_token_id,
    mask_tokens,
    tokenize,
    vocab_size,
)

VALUES = [0.0, 0.5, 0.99, 1.0, 1.5, 4.999, 5.0, 7.3]
TOKENS = [0, 0, 0, 1, 1, 4, 5, 5]  # min(v, n_bins) truncated, n_bins = 5


def test_bin_values_as_published() -> None:
    assert bin_values(np.array(VALUES), 5).tolist() == TOKENS
    assert bin_values(torch.tensor(VALUES), 5).tolist() == TOKENS
    assert bin_values(np.array(VALUES), 7).tolist() == [0, 0, 0, 1, 1, 4, 5, 7]


def test_bin_values_keeps_the_input_kind() -> None:
    assert isinstance(bin_values(np.array(VALUES), 5), np.ndarray)
    out = bin_values(torch.tensor(VALUES), 5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64


def test_tokenize_appends_token_zero_last() -> None:
    values = np.array([VALUES, VALUES[::-1]])
    tokens = tokenize(values, n_bins=5)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [[*TOKENS, 0], [*TOKENS[::-1], 0]]
    assert tokenize(np.array(VALUES), n_bins=5).tolist() == [*TOKENS, 0]  # one cell, 1-D


def _cells() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((5, 12)) < 0.4) * rng.uniform(0.1, 8.0, (5, 12))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_dense_and_sparse_inputs_agree() -> None:
    dense = _cells()
    expected = tokenize(dense, n_bins=5)
    assert expected[:, :-1].count_nonzero() > 0
    as_torch = torch.tensor(dense, dtype=torch.float32)
    torch.testing.assert_close(tokenize(as_torch, n_bins=5), expected)
    torch.testing.assert_close(tokenize(as_torch.to_sparse(), n_bins=5), expected)
    torch.testing.assert_close(tokenize(as_torch.to_sparse_csr(), n_bins=5), expected)


def test_scipy_sparse_input_agrees() -> None:
    sparse = pytest.importorskip("scipy.sparse")
    dense = _cells()
    expected = tokenize(dense, n_bins=5)
    torch.testing.assert_close(tokenize(sparse.csr_matrix(dense), n_bins=5), expected)
    torch.testing.assert_close(tokenize(sparse.csr_array(dense), n_bins=5), expected)
    assert isinstance(bin_values(sparse.csr_matrix(dense), 5), np.ndarray)


def test_scipy_duplicate_entries_are_summed() -> None:
    sparse = pytest.importorskip("scipy.sparse")
    matrix = sparse.coo_matrix(([0.6, 0.6], ([0, 0], [1, 1])), shape=(1, 3))
    assert bin_values(matrix.toarray(), 5).tolist() == [[0, 1, 0]]
    assert bin_values(matrix, 5).tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_values_rejected(bad: float) -> None:
    values = np.array([0.0, 1.0, bad])
    with pytest.raises(ValueError):
        bin_values(values, 5)
    with pytest.raises(ValueError):
        tokenize(torch.tensor(values), n_bins=5)


def test_bad_values_rejected_in_scipy_input() -> None:
    sparse = pytest.importorskip("scipy.sparse")
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            bin_values(sparse.csr_matrix(np.array([[0.0, 1.0, bad]])), 5)


def test_non_numeric_rejected() -> None:
    with pytest.raises(TypeError):
        bin_values(np.array(["1.0", "2.0"]), 5)
    with pytest.raises(TypeError):
        tokenize([["a", "b"]], n_bins=5)
    with pytest.raises(TypeError):
        bin_values(np.array([1.0, None], dtype=object), 5)


def test_special_token_ids() -> None:
    for n_bins in (5, 7):
        assert mask_token_id(n_bins) == n_bins + 1
        assert vocab_size(n_bins) == n_bins + 2
        config = ScBertConfig(n_genes=10, n_bins=n_bins)
        assert config.vocab_size == n_bins + 2
        assert config.seq_len == 11


# ---------------------------------------------------------------------------- masking

N_BINS = 5
MASK = N_BINS + 1


def cells_with_nonzero(counts: list[int], n_genes: int = 40, seed: int = 0) -> torch.Tensor:
    """Tokens (len(counts), n_genes + 1): cell i has exactly counts[i] non-zero tokens, at random
    positions, the appended position 0."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(counts), n_genes + 1, dtype=torch.int64)
    for row, k in enumerate(counts):
        where = torch.randperm(n_genes, generator=generator)[:k]
        tokens[row, where] = torch.randint(1, N_BINS + 1, (k,), generator=generator)
    return tokens


def run_mask(tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_tokens(tokens, n_bins=N_BINS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(5))
def test_mask_chooses_ceil_15_percent_of_nonzero_tokens(seed: int) -> None:
    counts = [20, 7, 0, 1, 40, 13]
    tokens = cells_with_nonzero(counts, seed=seed)
    _, labels = run_mask(tokens, seed)
    chosen = labels != IGNORE_INDEX
    assert chosen.sum(dim=1).tolist() == [math.ceil(0.15 * k - 1e-9) for k in counts]
    assert chosen.sum(dim=1).tolist() == [3, 2, 0, 1, 6, 2]
    assert not chosen[tokens == 0].any()  # token 0 positions never chosen ...
    assert not chosen[:, -1].any()  # ... the appended position included
    torch.testing.assert_close(labels[chosen], tokens[chosen])
    assert (labels[~chosen] == IGNORE_INDEX).all()


def test_mask_count_has_no_float_error() -> None:
    """ceil(0.15 * k) exactly: in float32, 0.15 * 100 rounds above 15 and would give 16."""
    tokens = cells_with_nonzero([100, 200, 180], n_genes=240)
    _, labels = run_mask(tokens, 0)
    assert (labels != IGNORE_INDEX).sum(dim=1).tolist() == [15, 30, 27]


def test_mask_replaces_about_90_percent_and_keeps_the_rest() -> None:
    tokens = cells_with_nonzero([20] * 2000, seed=1)
    original = tokens.clone()
    masked, labels = run_mask(tokens, 1)
    torch.testing.assert_close(tokens, original)  # input not modified
    chosen = labels != IGNORE_INDEX
    replaced = masked == MASK
    assert not replaced[~chosen].any()
    torch.testing.assert_close(masked[~chosen], tokens[~chosen])
    kept = chosen & ~replaced
    torch.testing.assert_close(masked[kept], tokens[kept])
    rate = replaced.sum().item() / chosen.sum().item()
    assert chosen.sum().item() == 2000 * 3
    assert 0.85 < rate < 0.95
    assert kept.any()


def test_mask_choice_is_uniform_over_nonzero_positions() -> None:
    one = cells_with_nonzero([20], seed=2)
    tokens = one.expand(3000, -1).clone()
    _, labels = run_mask(tokens, 2)
    frequency = (labels != IGNORE_INDEX).float().mean(dim=0)
    eligible = one[0] > 0
    assert frequency[eligible].min() > 0.12
    assert frequency[eligible].max() < 0.18
    assert (frequency[~eligible] == 0).all()


def test_mask_is_reproducible_from_the_generator() -> None:
    tokens = cells_with_nonzero([20, 30, 11], seed=3)
    first = run_mask(tokens, 7)
    again = run_mask(tokens, 7)
    other = run_mask(tokens, 8)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first[1], other[1])


def test_mask_never_chooses_mask_tokens_in_the_input() -> None:
    tokens = cells_with_nonzero([20], seed=4)
    tokens[0, :5] = MASK
    _, labels = run_mask(tokens, 4)
    assert not (labels[0, :5] != IGNORE_INDEX).any()


def test_gene_dropout_zeroes_about_p_of_the_expressed_genes_and_nothing_else() -> None:
    n_bins = 5
    tokens = torch.randint(0, n_bins + 1, (64, 400), generator=torch.Generator().manual_seed(1))
    tokens[:, :50] = 0  # not detected: stays 0
    tokens[:, 50:60] = mask_token_id(n_bins)  # a mask token is not an expression value
    tokens[:, -1] = 0  # the appended position
    before = tokens.clone()
    out = drop_genes(tokens, n_bins=n_bins, p=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, before)  # the input is not modified
    changed = out != tokens
    assert (out[changed] == 0).all()  # a dropped gene reads as not detected, nothing else
    assert not changed[:, :60].any()  # zeros and mask tokens are left as they are
    expressed = (tokens >= 1) & (tokens <= n_bins)
    rate = changed.sum().item() / expressed.sum().item()
    assert rate == pytest.approx(0.2, abs=0.02)  # ~17,000 expressed tokens
    again = drop_genes(tokens, n_bins=n_bins, p=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # reproducible from the generator
    assert drop_genes(tokens, n_bins=n_bins, p=0.0, generator=torch.Generator()) is tokens
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        drop_genes(tokens, n_bins=n_bins, p=1.0, generator=torch.Generator())
