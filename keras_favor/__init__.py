"""keras_favor: Performer (FAVOR+) linear attention for Keras 3."""

# keras_favor runs on these Keras backends (docs/training.md). Another
# one (torch, numpy, openvino) fails here, naming it, rather than deep
# inside the first layer's call.
SUPPORTED_BACKENDS = ("tensorflow", "jax")


def _check_backend():
    import os

    try:
        import keras
    except ImportError as error:
        # Keras imports its backend's package first: KERAS_BACKEND=torch
        # without PyTorch fails here.
        backend = os.environ.get("KERAS_BACKEND")
        where = f"KERAS_BACKEND={backend}" if backend else "keras.json"
        raise ImportError(
            f"keras_favor could not import Keras with the backend of {where}: "
            f"{error}. keras_favor supports the Keras backends "
            f"{' and '.join(SUPPORTED_BACKENDS)}; set KERAS_BACKEND to one "
            "of them."
        ) from None
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise ImportError(
            f"keras_favor does not support the Keras backend {backend!r} "
            f"(KERAS_BACKEND={backend}): it runs on "
            f"{' and '.join(SUPPORTED_BACKENDS)}. Set KERAS_BACKEND to one "
            "of them."
        )


_check_backend()

from keras_favor import callbacks  # noqa: E402
from keras_favor import convert  # noqa: E402
from keras_favor import distribute  # noqa: E402
from keras_favor import feature_maps  # noqa: E402
from keras_favor import generation  # noqa: E402
from keras_favor import models  # noqa: E402
from keras_favor import ops  # noqa: E402
from keras_favor import projections  # noqa: E402
from keras_favor.callbacks import FeatureRedraw  # noqa: E402
from keras_favor.generation import generate  # noqa: E402
from keras_favor.layers import FavorAttention  # noqa: E402
from keras_favor.layers import PerformerBlock  # noqa: E402
from keras_favor.models import build_performer  # noqa: E402
from keras_favor.version import __version__  # noqa: E402

__all__ = [
    "FavorAttention",
    "FeatureRedraw",
    "PerformerBlock",
    "SUPPORTED_BACKENDS",
    "__version__",
    "build_performer",
    "callbacks",
    "convert",
    "distribute",
    "feature_maps",
    "generate",
    "generation",
    "layers",
    "models",
    "ops",
    "projections",
]
