"""Models this project trains and ships (``data/tiny-llama``), and how to load any Llama-family model."""

from .load import MODELS, load_model, load_tokenizer, ModelError

__all__ = ["MODELS", "load_model", "load_tokenizer", "ModelError"]
