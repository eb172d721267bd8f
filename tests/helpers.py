"""Test helpers shared across the suite (import as `from helpers import ...`)."""

import torch


def random_llama(arch: str = "llama", hidden: int = 128, layers: int = 2, vocab: int = 256, seed: int = 0):
    """A randomly initialised tiny model of a Llama-family architecture (no hub access)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    cfg = cfg_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return model_cls(cfg).eval()
