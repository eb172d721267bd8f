"""Train the bundled tokenizer and tiny Llama (``data/tiny-llama``).

Run once; the result is committed, so users and CI never train::

    python -m mbq_ref.zoo.train_tiny --device cuda   # the committed weights' recipe: ~30 s on one H200
    python -m mbq_ref.zoo.train_tiny --resume        # continue after an interruption
    python -m mbq_ref.zoo.train_tiny --measure-only  # only re-measure fp_perplexity.json (~5 min on 2 cores)

On 2 CPU cores the default 30M-token run takes HOURS (roughly 4-5 h: the former
3M-token run took ~25 min there); never run it in CI (the tests train a tiny
config on a few hundred tokens).

Recipe (``TinyConfig.paper()``, ``data/README.md``): batch 64 x 512 random
windows of the mixed ``train`` splits, AdamW (betas 0.9/0.95, weight decay 0.1),
lr 3e-3 with 100 warm-up steps and cosine decay to 10 %, gradient clipping 1.0,
bf16 autocast on CUDA, 30M tokens (915 steps, ~10 passes over the 2.9M-token
stream). The validation perplexity (first 8 x 512 tokens of each ``validation``
split) is logged every 100 steps: with this recipe it keeps falling up to ~30M
tokens, and training twice as long overfits (``data/README.md``). A run on another
GPU or on the CPU gives different weights of similar quality, so the tests check
properties (perplexity, quantization sensitivity), not bytes.

The model is a real ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, grouped-query
attention as in Llama 3), sized so every quantized linear layer has an input
dimension that is a multiple of the paper's group size 128 (App. C.1).
Training data: the ``train`` splits of the three bundled corpora, mixed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import BUNDLED, load_corpus
from ..paths import model_dir
from .load import ModelError

__all__ = ["TinyConfig", "train_tokenizer", "train"]


@dataclass
class TinyConfig:
    """Architecture and training recipe of the bundled tiny Llama (defaults = :meth:`paper`)."""

    vocab_size: int = 8192
    hidden_size: int = 256  # multiple of 128: q/k/v/gate/up groups of 128
    intermediate_size: int = 768  # multiple of 128: down_proj groups of 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim 64
    num_key_value_heads: int = 2  # GQA, as in Llama 3
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    # training: random windows of seqlen + 1 tokens over the mixed train splits
    seqlen: int = 512
    batch_size: int = 64
    train_tokens: int = 30_000_000  # ~10 passes over the 2.9M-token train stream
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decay ends at 10 % of the peak
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 50  # steps between resume states
    eval_every: int = 100  # steps between validation perplexities
    val_windows: int = 8  # per validation split, of seqlen tokens

    @property
    def steps(self) -> int:
        return self.train_tokens // (self.seqlen * self.batch_size)

    @classmethod
    def paper(cls) -> "TinyConfig":
        """The recipe of the committed weights (``data/README.md``): 915 steps of 64 x 512 = 30M tokens."""
        return cls()

    @classmethod
    def tiny(cls) -> "TinyConfig":
        """A seconds-long smoke run (tiny model and budget; nothing to learn from its weights)."""
        return cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=32, seqlen=16, batch_size=2, train_tokens=16 * 2 * 4,
                   warmup_steps=1, save_every=2, eval_every=2, val_windows=2)  # fmt: skip


def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """Byte-level BPE (GPT-2/Llama-3 style), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llama_config(cfg: TinyConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _lr_at(step: int, cfg: TinyConfig) -> float:
    """Linear warm-up (a factor ``(step + 1) / warmup``) on top of a cosine from ``lr`` to ``min_lr`` over the run."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    t = min(1.0, step / max(1, cfg.steps))
    return warm * (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t)))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is visible to torch; use --device cpu (hours) or auto")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def _next_token_loss(model, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean cross-entropy of ``x[:, 1:]`` given ``x[:, :-1]`` (``x``: ``[B, T + 1]``), logits in float32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def _val_ppl(model, val: torch.Tensor, autocast: bool, batch: int = 8) -> float:
    """Perplexity over the validation windows ``val`` ``[W, T + 1]`` (every window weighs the same)."""
    model.eval()
    nll = sum(float(_next_token_loss(model, val[i : i + batch], autocast)) * len(val[i : i + batch])
              for i in range(0, len(val), batch))  # fmt: skip
    model.train()
    return math.exp(nll / len(val))


def train(
    cfg: TinyConfig,
    out: Path,
    resume: bool = False,
    compile: bool = False,
    texts: list[str] | None = None,
    val_texts: list[str] | None = None,
    stop_after: int | None = None,
    device: str = "auto",
) -> dict:
    """Train tokenizer + model into ``out``; log the validation perplexity every ``cfg.eval_every`` steps.

    ``texts``/``val_texts`` override the bundled train/validation splits and
    ``stop_after`` simulates an interruption after that many steps (both for tests).
    The run is resumable bit for bit on the same device (``resume=True``).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    dev = _resolve_device(device)
    autocast = dev.type == "cuda"  # bf16 autocast on the GPU; float32 on the CPU
    torch.manual_seed(cfg.seed)
    windows_rng = torch.Generator().manual_seed(cfg.seed)  # window starts, on the CPU: the same on every device
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "train_state"
    train_texts = texts if texts is not None else [load_corpus(d, "train") for d in BUNDLED]
    val_texts = val_texts if val_texts is not None else [load_corpus(d, "validation") for d in BUNDLED]

    if resume and (out / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
        tokenizer.save_pretrained(out)
        print(f"tokenizer: {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s")

    def encode(t: str) -> torch.Tensor:
        return torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])

    # one token stream, domains interleaved by random windows below
    ids = torch.cat([encode(t) for t in train_texts]).to(dev)
    T = cfg.seqlen + 1
    val = []  # the first val_windows windows of each validation split (fewer if a split is shorter)
    for t in val_texts:
        v = encode(t)
        n = min(cfg.val_windows, v.numel() // T)
        val.append(v[: n * T].view(n, T))
    val = torch.cat(val).to(dev)
    if not len(val):
        raise ModelError(f"the validation texts hold fewer than {T} tokens; nothing to validate on")
    print(f"training stream: {ids.numel():,} tokens; {cfg.steps} steps of {cfg.batch_size}x{cfg.seqlen} on {dev}; "
          f"{len(val)} validation windows")  # fmt: skip

    model = LlamaForCausalLM(_llama_config(cfg, tokenizer)).to(dev)
    # the recipe decays every parameter (norm gains included), as AdamW does by default
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step, log, val_log = 0, [], []
    if resume and (state_dir / "state.pt").is_file():
        # weights_only=True: a resume file can never run code when loaded
        st = torch.load(state_dir / "state.pt", weights_only=True, map_location=dev)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, log, val_log = int(st["step"]), json.loads(st["log"]), json.loads(st["val_log"])
        torch.set_rng_state(st["rng"].cpu())
        windows_rng.set_state(st["windows_rng"].cpu())
        print(f"resumed at step {step}")
    params = sum(p.numel() for p in model.parameters())
    fwd = torch.compile(model) if compile else model
    model.train()
    pbar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train tiny-llama")
    t0 = time.time()
    for step in pbar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, ids.numel() - T, (cfg.batch_size,), generator=windows_rng)
        batch = torch.stack([ids[s : s + T] for s in starts.tolist()])
        loss = _next_token_loss(fwd, batch, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        log.append(round(loss.item(), 4))
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            # validation perplexity during training: the curve shows when more tokens start to overfit
            val_log.append({"step": done, "tokens": done * cfg.batch_size * cfg.seqlen,
                            "val_ppl": round(_val_ppl(fwd, val, autocast), 3)})  # fmt: skip
            tqdm.write(f"step {done}: train loss {loss.item():.3f}, validation perplexity {val_log[-1]['val_ppl']:.2f}")
        pbar.set_postfix(loss=f"{loss.item():.3f}", val_ppl=val_log[-1]["val_ppl"] if val_log else "-")
        if done % cfg.save_every == 0 or done == cfg.steps:
            state_dir.mkdir(exist_ok=True)
            tmp = state_dir / "state.pt.tmp"
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": done, "log": json.dumps(log),
                 "val_log": json.dumps(val_log), "rng": torch.get_rng_state(), "windows_rng": windows_rng.get_state()},
                tmp,
            )  # fmt: skip
            tmp.replace(state_dir / "state.pt")  # atomic: an interruption never leaves a half-written state
        if stop_after is not None and done >= stop_after:
            return {"stopped_at": done}
    wall = time.time() - t0
    model.eval()
    model.float().save_pretrained(out)
    info = {
        "config": asdict(cfg),
        "parameters": params,
        "train_stream_tokens": int(ids.numel()),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "final_loss_mean_last50": float(sum(log[-50:]) / max(1, len(log[-50:]))),
        "validation_ppl": val_log,
        "loss_curve": log,
        "wall_seconds_this_run": round(wall, 1),
        "torch": torch.__version__,
    }
    (out / "training_log.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def measure_reference(out: Path, seqlen: int = 512) -> dict:
    """FP perplexity of the trained model on every bundled test split (full protocol).

    Written to ``OUT/fp_perplexity.json``; the README quotes it and
    ``tests/test_perplexity.py`` checks it reproduces within 1%.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import tokenize_corpus
    from ..perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    res = {"seqlen": seqlen, "torch": torch.__version__, "ppl": {}}
    for name in BUNDLED:
        ids = tokenize_corpus(tok, load_corpus(name, "test"))
        r = perplexity(model, ids, seqlen=seqlen, desc=f"FP {name}")
        res["ppl"][name] = {"ppl": round(r.ppl, 4), "windows": r.n_windows, "tokens": int(ids.numel())}
    (out / "fp_perplexity.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: data/tiny-llama)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto = cuda when torch sees a GPU (bf16 autocast), else cpu (float32, hours)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state/state.pt")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (faster after a warm-up)")
    ap.add_argument("--train-tokens", type=int, default=TinyConfig.train_tokens,
                    help=f"training budget (default {TinyConfig.train_tokens:,}: the committed weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-only", action="store_true", help="only (re)measure OUT/fp_perplexity.json")
    args = ap.parse_args(argv)
    cfg = TinyConfig(train_tokens=args.train_tokens, seed=args.seed)
    out = args.out or model_dir("tiny-llama")
    if not args.measure_only:
        try:
            info = train(cfg, out, resume=args.resume, compile=args.compile, device=args.device)
        except ModelError as exc:
            raise SystemExit(f"error: {exc}") from None
        print(f"done: {info['parameters']:,} parameters, final loss {info['final_loss_mean_last50']:.3f}")
    for name, r in measure_reference(out)["ppl"].items():
        print(f"FP perplexity {name}: {r['ppl']:.3f} ({r['windows']} windows)")


if __name__ == "__main__":
    main()
