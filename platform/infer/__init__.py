"""Inference: loading a model, annotate/embed (local or on Ray), explain, plots."""
