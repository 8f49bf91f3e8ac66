"""Generation with causal language models: `generate`, the cached forward
pass it is built on (`empty_cache`, `call_with_cache`), and a SavedModel
that generates (`export_language_model`)."""

from keras_favor.generation.export import export_language_model
from keras_favor.generation.generate import generate
from keras_favor.generation.language_model_cache import call_with_cache
from keras_favor.generation.language_model_cache import empty_cache

__all__ = [
    "call_with_cache",
    "empty_cache",
    "export_language_model",
    "generate",
]
