"""scBERT: the Performer-based BERT for cell-type annotation (Yang et al., NMI 2022).

Pure torch + einops + numpy: no Ray, MLflow, DVC or AnnData here. The names below are imported
on first use (PEP 562), so that ``import scbert.config`` (the platform's params read its
defaults) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scbert.attention import SelfAttention, favor_attention, orthogonal_features
    from scbert.checkpoint import (
        ModelBundle,
        export_published,
        load_pretrained,
        load_published,
        save_pretrained,
    )
    from scbert.config import ScBertConfig
    from scbert.embedding import load_gene2vec_npy, load_gene2vec_text
    from scbert.masking import IGNORE_INDEX, drop_genes, mask_tokens
    from scbert.model import UNASSIGNED, ScBert, assign_cell_types
    from scbert.tokens import bin_values, mask_token_id, tokenize, vocab_size

# name -> the module that defines it
_SOURCES = {
    "IGNORE_INDEX": "scbert.masking",
    "UNASSIGNED": "scbert.model",
    "ModelBundle": "scbert.checkpoint",
    "ScBert": "scbert.model",
    "ScBertConfig": "scbert.config",
    "SelfAttention": "scbert.attention",
    "assign_cell_types": "scbert.model",
    "bin_values": "scbert.tokens",
    "drop_genes": "scbert.masking",
    "export_published": "scbert.checkpoint",
    "favor_attention": "scbert.attention",
    "load_gene2vec_npy": "scbert.embedding",
    "load_gene2vec_text": "scbert.embedding",
    "load_pretrained": "scbert.checkpoint",
    "load_published": "scbert.checkpoint",
    "mask_token_id": "scbert.tokens",
    "mask_tokens": "scbert.masking",
    "orthogonal_features": "scbert.attention",
    "save_pretrained": "scbert.checkpoint",
    "tokenize": "scbert.tokens",
    "vocab_size": "scbert.tokens",
}

__all__ = [
    "IGNORE_INDEX",
    "UNASSIGNED",
    "ModelBundle",
    "ScBert",
    "ScBertConfig",
    "SelfAttention",
    "assign_cell_types",
    "bin_values",
    "drop_genes",
    "export_published",
    "favor_attention",
    "load_gene2vec_npy",
    "load_gene2vec_text",
    "load_pretrained",
    "load_published",
    "mask_token_id",
    "mask_tokens",
    "orthogonal_features",
    "save_pretrained",
    "tokenize",
    "vocab_size",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'scbert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
