"""Generation with causal language models: `generate`, and the cached
forward pass it is built on (`empty_cache`, `call_with_cache`)."""

from keras_favor.generation.generate import generate
from keras_favor.generation.language_model_cache import call_with_cache
from keras_favor.generation.language_model_cache import empty_cache

__all__ = ["call_with_cache", "empty_cache", "generate"]
