"""Ray Serve application for scBERT annotation (coming with the Serve issue)."""
