"""The errors of ingest: ``IngestError`` for input that cannot be ingested, ``ShardError`` for an
ingested shard directory that is incomplete or damaged. Every module of ``scbert ingest``
raises them, and every reader of shards (the loader, training, tune) catches them."""

from __future__ import annotations

from scbert_platform.data.preprocess import PreprocessError


class IngestError(PreprocessError):
    """Input that cannot be ingested; the message names the problem and the fix."""


class ShardError(IngestError):
    """An ingested shard directory that is incomplete or damaged (its manifest missing or not
    JSON, a shard missing, truncated or changed since ingest): the message names the file and
    how to get the directory back."""
