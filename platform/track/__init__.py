"""Tracking: MLflow runs, the pyfunc model, the registry and its gates."""
