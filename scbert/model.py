"""scBERT: a Performer encoder over binned expression tokens, and its two heads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scbert.attention import SelfAttention
from scbert.config import CELL_EMBEDDINGS, UNASSIGNED_THRESHOLD, ScBertConfig
from scbert.embedding import GeneEmbedding

UNASSIGNED = "Unassigned"


class FeedForward(nn.Module):
    """dim -> ff_mult * dim -> dim with GELU."""

    def __init__(self, *, config: ScBertConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.dim * config.ff_mult)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.ff_dropout)
        self.w2 = nn.Linear(config.dim * config.ff_mult, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, *, config: ScBertConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = SelfAttention(config=config)
        self.ff_norm = nn.LayerNorm(config.dim)
        self.ff = FeedForward(config=config)

    def forward(
        self, x: torch.Tensor, column_sums: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, sums = self.attn(self.attn_norm(x), column_sums=column_sums)
        x = x + attended
        return x + self.ff(self.ff_norm(x)), sums


class PerformerEncoder(nn.Module):
    """``depth`` blocks; owns the feature-redraw schedule of all attention layers.

    As published, each training-mode forward first checks the counter: at the interval every
    projection is redrawn and the counter reset, otherwise the call is counted. Eval mode never
    redraws, and ``freeze_projections()`` stops redraws in training too.
    """

    calls_since_redraw: torch.Tensor  # int64 scalar buffer

    def __init__(self, *, config: ScBertConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(config=config) for _ in range(config.depth)])
        self.feature_redraw_interval = config.feature_redraw_interval
        self.activation_checkpointing = config.activation_checkpointing
        self.projections_frozen = False
        self.register_buffer("calls_since_redraw", torch.tensor(0))
        # the counter's value on the host: reading the buffer on every training call would make
        # each step wait for a GPU (a host sync); None = read it once (at start, after a load)
        self._calls: int | None = None

    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        """Redraw every block's random projection now and reset the counter."""
        for block in self.blocks:
            cast(Block, block).attn.redraw_projection(generator)
        self.calls_since_redraw.zero_()
        self._calls = 0

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._calls = None  # the loaded buffer is the count now
        super()._load_from_state_dict(*args, **kwargs)

    def freeze_projections(self, frozen: bool = True) -> None:
        """Keep the current projections in training mode too (or resume the schedule)."""
        self.projections_frozen = frozen

    def _count_call(self) -> None:
        interval = self.feature_redraw_interval
        if not self.training or self.projections_frozen or interval is None:
            return
        if self._calls is None:
            self._calls = int(self.calls_since_redraw)
        if self._calls >= interval:
            self.redraw_projections()
        else:
            self._calls += 1
            self.calls_since_redraw += 1

    def forward(
        self, x: torch.Tensor, column_sums: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (b, n, dim) -> (b, n, dim); with ``column_sums`` also the mean over layers (b, n)."""
        self._count_call()
        total: torch.Tensor | None = None
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not column_sums
        for block in self.blocks:
            if recompute:
                x, sums = checkpoint(block, x, use_reentrant=False)
            else:
                x, sums = block(x, column_sums)
            if sums is not None:
                total = sums if total is None else total + sums
        return x, None if total is None else total / len(self.blocks)


class ReconstructionHead(nn.Module):
    """Pretraining head: logits over the token vocabulary at every position."""

    def __init__(self, *, config: ScBertConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.dim, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (b, n_genes + 1, n_bins + 2)


class CellTypeHead(nn.Module):
    """Fine-tuning head as published: a 1 x dim convolution over each gene's vector + ReLU (one
    scalar per position), flattened, then MLP (n_genes + 1) -> 512 -> 128 -> n_classes. With
    ``config.cls_token_input`` each position's token (its expression bin, 0 at the appended
    position) is added to its scalar, and with ``config.cls_encoder_gate`` the encoder's scalar is
    first multiplied by a learned gate that starts at 0."""

    def __init__(self, *, config: ScBertConfig) -> None:
        super().__init__()
        if config.n_classes is None:
            raise ValueError("CellTypeHead needs config.n_classes")
        hidden1, hidden2 = config.cls_hidden
        self.per_gene = nn.Linear(config.dim, 1)  # = Conv2d(1, 1, (1, dim)) of the published code
        self.fc1 = nn.Linear(config.seq_len, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, config.n_classes)
        self.act = nn.ReLU()
        self.gene_act = nn.LeakyReLU(0.2) if config.cls_activation == "leaky_relu" else self.act
        self.dropout = nn.Dropout(config.cls_dropout)
        self.token_input = config.cls_token_input
        # ``config.cls_encoder_gate``: the encoder's share of each scalar, learned from 0
        self.encoder_gate = nn.Parameter(torch.zeros(())) if config.cls_encoder_gate else None

    def hidden(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (b, 128): what the classifier separates the types in; ``x`` the
        encodings (b, n_genes + 1, dim) of ``tokens`` (b, n_genes + 1)."""
        x = self.gene_act(self.per_gene(x)).squeeze(-1)  # (b, n_genes + 1)
        if self.encoder_gate is not None:
            x = self.encoder_gate * x
        if self.token_input:
            x = x + tokens.to(x.dtype)
        x = self.dropout(self.act(self.fc1(x)))
        return self.dropout(self.act(self.fc2(x)))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.hidden(x, tokens))  # (b, n_classes)

    @torch.no_grad()
    def fold_temperature(self, temperature: float) -> None:
        """Divide the logits by ``temperature`` for good (temperature scaling, Guo et al. 2017):
        softmax(z / T) from the weights themselves, so every caller gets calibrated
        probabilities; the argmax does not change."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.fc3.weight.div_(temperature)
        self.fc3.bias.div_(temperature)


class ScBert(nn.Module):
    """scBERT: token (expression bin) embedding + gene embedding -> Performer -> LayerNorm -> head.

    ``tokens`` are integers (b, n_genes + 1) from ``scbert.tokens.tokenize`` (int64) or the data
    loader (uint8, widened here). With
    ``config.n_classes`` set the head is the cell-type classifier, else the reconstruction head.
    """

    def __init__(self, *, config: ScBertConfig, gene2vec: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.gene_emb = GeneEmbedding(config=config, gene2vec=gene2vec)
        self.emb_dropout = nn.Dropout(config.emb_dropout)
        self.encoder = PerformerEncoder(config=config)
        self.norm = nn.LayerNorm(config.dim)
        self.head: nn.Module = (
            CellTypeHead(config=config) if config.n_classes else ReconstructionHead(config=config)
        )

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.config.seq_len:
            raise ValueError(
                f"tokens must be (n_cells, {self.config.seq_len}) = (n_cells, n_genes + 1), "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.dtype not in (torch.int32, torch.int64):
            tokens = tokens.long()  # compact uint8 tokens from the loader, widened on the device
        return self.emb_dropout(self.token_emb(tokens) + self.gene_emb())  # (b, n_genes + 1, dim)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Contextual gene embeddings after the final LayerNorm, (b, n_genes + 1, dim)."""
        x, _ = self.encoder(self._embed(tokens))
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits (b, n_classes), or reconstruction logits (b, n_genes + 1, n_bins + 2)."""
        if isinstance(self.head, CellTypeHead):
            return self.head(self.encode(tokens), tokens)
        out: torch.Tensor = self.head(self.encode(tokens))
        return out

    def embed_cells(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cell embedding (b, dim): the mean of the encodings over the gene positions (the appended
        position excluded). The paper does not define one; this is ours."""
        return self.encode(tokens)[:, :-1].mean(dim=1)

    def predict_proba(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class probabilities (b, n_classes) of a fine-tuned model."""
        if self.config.n_classes is None:
            raise ValueError("predict_proba needs a fine-tuned model (config.n_classes is None)")
        return self.forward(tokens).softmax(dim=-1)

    def predict(
        self, tokens: torch.Tensor, *, embedding: str = "encoder"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder pass: class probabilities (b, n_classes), or (b, 0) for a pretraining
        model, and the cell embedding: ``encoder``, the mean encoding over the gene positions
        (b, dim) as ``embed_cells``; ``classifier``, the cell-type head's last hidden layer
        (b, cls_hidden[1]), where the classifier separates the types."""
        if embedding not in CELL_EMBEDDINGS:
            raise ValueError(f"embedding must be one of {CELL_EMBEDDINGS}, got {embedding!r}")
        encoded = self.encode(tokens)  # (b, n_genes + 1, dim)
        if self.config.n_classes is None:
            if embedding == "classifier":
                raise ValueError("the classifier embedding needs a fine-tuned model")
            return encoded.new_zeros((len(tokens), 0)).float(), encoded[:, :-1].mean(dim=1)
        assert isinstance(self.head, CellTypeHead)
        hidden = self.head.hidden(encoded, tokens)  # (b, cls_hidden[1])
        proba = self.head.fc3(hidden).float().softmax(dim=-1)
        return proba, hidden if embedding == "classifier" else encoded[:, :-1].mean(dim=1)

    @torch.no_grad()
    def attention_sums(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention each gene receives, sum over query positions of the attention matrix,
        averaged over heads and layers (paper Fig. 5), (b, n_genes); O(n) memory."""
        _, sums = self.encoder(self._embed(tokens), column_sums=True)
        assert sums is not None
        return sums[:, :-1]

    def with_cell_type_head(
        self,
        n_classes: int,
        *,
        activation: str | None = None,
        dropout: float | None = None,
        token_input: bool | None = None,
        encoder_gate: bool | None = None,
    ) -> ScBert:
        """Swap in a fresh cell-type head (n_classes; ``activation``: its per-gene activation,
        ``ScBertConfig.cls_activation``, ``dropout``, ``cls_dropout``, ``token_input``,
        ``cls_token_input``, and ``encoder_gate``, ``cls_encoder_gate``, each unchanged when None)
        for fine-tuning; returns self."""
        change: dict[str, Any] = {"n_classes": n_classes}
        if activation is not None:
            change["cls_activation"] = activation
        if dropout is not None:
            change["cls_dropout"] = dropout
        if token_input is not None:
            change["cls_token_input"] = token_input
        if encoder_gate is not None:
            change["cls_encoder_gate"] = encoder_gate
        self.config = dataclasses.replace(self.config, **change)
        self.head = CellTypeHead(config=self.config).to(self.token_emb.weight.device)
        return self


def assign_cell_types(
    proba: torch.Tensor, classes: Sequence[str], *, threshold: float = UNASSIGNED_THRESHOLD
) -> list[str]:
    """Name of the most probable class per cell, or ``Unassigned`` when its probability is below
    ``threshold`` (the paper's novel-cell-type rule, threshold 0.5)."""
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba must be (n_cells, {len(classes)}), got {tuple(proba.shape)}")
    best, index = proba.max(dim=1)
    return [
        classes[i] if p >= threshold else UNASSIGNED
        for p, i in zip(best.tolist(), index.tolist(), strict=True)
    ]
