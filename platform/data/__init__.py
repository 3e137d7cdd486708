"""Data: real and synthetic inputs, validation and preprocessing, Parquet shards, splits and
the loader."""
