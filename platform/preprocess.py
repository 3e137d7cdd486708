"""The old path of the preprocessing record, kept so that MLflow models logged before the move of
``platform/`` into subpackages (2026-11-28) still load: their pickled python model holds a
``scbert_platform.preprocess.Preprocessing``. The code is ``scbert_platform.data.preprocess``."""

from scbert_platform.data.preprocess import Preprocessing

__all__ = ["Preprocessing"]
