"""Masked-value pretraining targets, as published (scBERT pretrain.py ``data_mask``)."""

from __future__ import annotations

import torch

from scbert.tokens import mask_token_id

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def mask_tokens(
    tokens: torch.Tensor,
    *,
    n_bins: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to reconstruct and corrupt them.

    Per cell exactly ceil(mask_prob * k) positions are chosen uniformly among its k non-zero
    tokens (token 0, which includes the appended position, is never chosen); each chosen position
    becomes the mask token with probability ``replace_prob`` and is left unchanged otherwise.

    Returns (masked tokens, labels): labels hold the original token at chosen positions and
    ``IGNORE_INDEX`` elsewhere. ``tokens`` (b, n) is not modified.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (n_cells, n_positions), got {tuple(tokens.shape)}")
    eligible = _expressed(tokens, n_bins)
    # float64 with a small tolerance so that e.g. 0.15 * 20 gives 3, not 4
    n_chosen = torch.ceil(eligible.sum(dim=1, dtype=torch.float64) * mask_prob - 1e-9)  # (b,)
    scores = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    scores = scores.masked_fill(~eligible, -1.0)  # ineligible positions rank last
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(tokens.shape[1], device=tokens.device).expand_as(order)
    )
    chosen = (ranks < n_chosen.unsqueeze(1)) & eligible
    replace = torch.rand(tokens.shape, generator=generator, device=tokens.device) < replace_prob
    masked = tokens.masked_fill(chosen & replace, mask_token_id(n_bins))
    labels = tokens.masked_fill(~chosen, IGNORE_INDEX)
    return masked, labels


def drop_genes(
    tokens: torch.Tensor, *, n_bins: int, p: float, generator: torch.Generator
) -> torch.Tensor:
    """Fine-tuning augmentation: each expressed gene (token 1..n_bins) reads as not detected
    (token 0) with probability ``p``, independently per cell, as a dropout event of the assay
    would. The appended position, mask tokens and zeros are left as they are; ``tokens`` (b, n)
    is not modified. ``p`` 0 returns ``tokens`` itself."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if p == 0:
        return tokens
    dropped = torch.rand(tokens.shape, generator=generator, device=tokens.device) < p
    return tokens.masked_fill(_expressed(tokens, n_bins) & dropped, 0)


def _expressed(tokens: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Where a token is an expression bin (1..n_bins): not 0 (not detected, or the appended
    position) and not the mask token."""
    return (tokens >= 1) & (tokens <= n_bins)
