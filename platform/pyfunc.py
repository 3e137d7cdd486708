"""The old path of the pyfunc's class, kept so that MLflow models logged before the move of
``platform/`` into subpackages (2026-11-28) still load: their pickled python model names the class
as ``scbert_platform.pyfunc.ScBertAnnotator``. The code is ``scbert_platform.track.pyfunc``; models
logged since pickle only the class, by its new path (``track.pyfunc.log_pyfunc``)."""

from scbert_platform.track.pyfunc import ScBertAnnotator

__all__ = ["ScBertAnnotator"]
