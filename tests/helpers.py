"""Test helpers shared across the suite (import as `from helpers import ...`)."""

import torch


def random_llama(arch: str = "llama", hidden: int = 128, layers: int = 2, vocab: int = 256, seed: int = 0, **config):
    """A randomly initialised tiny model of a Llama-family architecture (no hub access).

    ``config``: further config fields, overriding the defaults (``sliding_window=8``,
    ``attn_implementation="eager"``, ``max_position_embeddings=128``, ...).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    cfg = cfg_cls(**{
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **config,
    })  # fmt: skip
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


class small_mount:
    """A real tiny tmpfs mounted at a fresh folder (``size`` bytes, read-only if ``ro``), unmounted on exit.

    Reproduces a full or read-only filesystem for real; needs root (``pytest.skip`` otherwise).
    """

    def __init__(self, size: int = 64 * 1024, ro: bool = False):
        self.size, self.ro = size, ro

    def __enter__(self):
        import subprocess
        import tempfile
        from pathlib import Path

        import pytest

        self.path = Path(tempfile.mkdtemp(prefix="mbq-mount-"))
        opts = f"size={self.size}" + (",ro" if self.ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)], capture_output=True, check=False)
        if r.returncode:
            self.path.rmdir()
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
        return self.path

    def __exit__(self, *exc):
        import subprocess

        subprocess.run(["umount", str(self.path)], check=False)
        self.path.rmdir()
        return False
