"""Randomly initialised Llama-family models of any size (no weights, no hub): for tests, timings and exercises."""

from __future__ import annotations

import torch

__all__ = ["ARCHITECTURES", "random_llama"]

#: Architectures :func:`random_llama` builds (all quantized by the same code paths as Llama).
ARCHITECTURES = ("llama", "qwen2", "mistral")


def random_llama(arch: str = "llama", hidden: int = 128, layers: int = 2, vocab: int = 256, seed: int = 0, **config):
    """A randomly initialised causal LM (eval mode) of a Llama-family architecture.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        hidden: model width; the MLP is ``2 * hidden`` wide, 4 attention heads, 2 KV heads.
        layers: decoder blocks.
        vocab: vocabulary size.
        seed: ``torch.manual_seed`` before initialisation (same seed, same weights).
        config: further config fields, overriding the defaults above (e.g. ``sliding_window=8``,
            ``attn_implementation="eager"``, ``max_position_embeddings=128``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    cfg_cls, model_cls = classes[arch]
    cfg = cfg_cls(**{
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **config,
    })  # fmt: skip
    torch.manual_seed(seed)
    return model_cls(cfg).eval()
