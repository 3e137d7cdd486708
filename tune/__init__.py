"""Studies over many training runs and the model registry (``scbert sweep``, ``cv``, ``register``,
``promote``).

- ``sweep``: Ray Tune sweeps over dotted parameters (default: the paper's sensitivity grid).
- ``cv``: cross-validation protocols (5 folds, reference size, leave one dataset out, novel type),
  one Ray Tune trial per held-out part, calibration reported per fold.
- ``trials``: what both share: each trial a Ray Train fine-tuning run under one MLflow parent run,
  restorable with ``--resume``.
- ``baselines``: scikit-learn logistic regression and kNN on the same folds and input.
- ``registry``: ``register`` (alias ``challenger``), ``promote`` past the gate (alias
  ``champion``), ``rollback``.
"""
