"""The one model config: every architectural fact of scBERT lives here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

GeneEmbeddingKind = Literal["gene2vec", "learned", "none"]


CLS_ACTIVATIONS = ("relu", "leaky_relu")
CELL_EMBEDDINGS = ("encoder", "classifier")  # ScBert.predict's embedding kinds
# the paper's novel-type rule: a cell whose top probability is below this is Unassigned
UNASSIGNED_THRESHOLD = 0.5


def default_nb_features(dim_head: int) -> int:
    """Random features per head in the published Performer: ``int(dim_head * ln(dim_head))``."""
    return int(dim_head * math.log(dim_head))


@dataclass(kw_only=True)
class ScBertConfig:
    """Architecture of scBERT (defaults are the paper's; Yang et al. 2022, Methods).

    ``gene_embedding`` says where gene identity comes from: ``"gene2vec"`` is the paper's fixed
    (not trained) matrix passed to the model as a tensor; ``"learned"`` is a trained
    ``nn.Embedding`` used when no gene2vec matrix is available (a deviation from the paper);
    ``"none"`` reproduces published checkpoints trained with ``pos_embed=False``.
    """

    n_genes: int
    n_bins: int = 5
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    nb_features: int = 0  # 0 means default_nb_features(dim_head) = 266 for dim_head 64
    feature_redraw_interval: int | None = 1000
    ff_mult: int = 4
    qkv_bias: bool = False
    emb_dropout: float = 0.0
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    n_classes: int | None = None  # None: pretraining (reconstruction head)
    cls_hidden: tuple[int, int] = field(default=(512, 128))
    cls_dropout: float = 0.0
    # the activation of the head's per-gene scalar: "relu" as published, or "leaky_relu" (slope
    # 0.2), which cannot die. With ReLU, when every gene's scalar is below zero for every cell (at
    # initialisation for some seeds, or after a few large early steps), the head's input is
    # constant, no gradient reaches the encoder, and the model predicts one class for good
    # (docs/training.md, "Collapsed runs")
    cls_activation: str = "relu"
    # the head also reads each gene's token as a number, added to the encoder's per-gene scalar
    # (not published; a skip past the encoder, so the head sees the expression levels themselves
    # beside their context: docs/training.md, "The head reads the tokens")
    cls_token_input: bool = False
    # the encoder's per-gene scalar is multiplied by a learned gate that starts at 0, so that the
    # head starts from the tokens alone and takes in the encoder as far as training finds it
    # useful (not published; docs/training.md, "The encoder's gate")
    cls_encoder_gate: bool = False
    gene_embedding: GeneEmbeddingKind = "gene2vec"
    activation_checkpointing: bool = False  # recompute each block in backward (memory for time)

    def __post_init__(self) -> None:
        if self.nb_features == 0:
            self.nb_features = default_nb_features(self.dim_head)
        self.cls_hidden = (int(self.cls_hidden[0]), int(self.cls_hidden[1]))
        positive = (
            "n_genes",
            "n_bins",
            "dim",
            "depth",
            "heads",
            "dim_head",
            "nb_features",
            "ff_mult",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if self.n_classes is not None and self.n_classes < 2:
            bad.append(f"n_classes={self.n_classes} (need >= 2, or None for pretraining)")
        if self.cls_activation not in CLS_ACTIVATIONS:
            bad.append(f"cls_activation={self.cls_activation!r} ({'|'.join(CLS_ACTIVATIONS)})")
        if self.cls_encoder_gate and not self.cls_token_input:
            bad.append("cls_encoder_gate=True (needs cls_token_input=True: a blind start)")
        if self.gene_embedding not in ("gene2vec", "learned", "none"):
            bad.append(f"gene_embedding={self.gene_embedding!r} (gene2vec|learned|none)")
        if bad:
            raise ValueError(f"invalid ScBertConfig: {', '.join(bad)}")

    @property
    def seq_len(self) -> int:
        """Positions per cell: one per panel gene plus the appended position."""
        return self.n_genes + 1

    @property
    def vocab_size(self) -> int:
        """Bins 0..n_bins plus the mask token."""
        return self.n_bins + 2

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cls_hidden"] = list(self.cls_hidden)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScBertConfig:
        """Build from a dict (``config.json``); unknown keys are an error naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown ScBertConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)
