"""Ray Tune sweeps, 5-fold cross-validation and the promotion gate (coming with the Tune issue)."""
