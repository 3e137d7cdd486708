"""scBERT: the Performer-based BERT for cell-type annotation (Yang et al., NMI 2022).

Pure torch + einops + numpy: no Ray, MLflow, DVC or AnnData here.
"""

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
from scbert.masking import IGNORE_INDEX, mask_tokens
from scbert.model import UNASSIGNED, ScBert, assign_cell_types
from scbert.tokens import bin_values, mask_token_id, tokenize, vocab_size

__all__ = [
    "IGNORE_INDEX",
    "UNASSIGNED",
    "ModelBundle",
    "ScBert",
    "ScBertConfig",
    "SelfAttention",
    "assign_cell_types",
    "bin_values",
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
