"""Train the bundled tokenizer and tiny Llama (``data/tiny-llama``).

Run once; the result is committed, so users and CI never train::

    python -m mbq_ref.zoo.train_tiny              # ~25 min on 2 CPU cores
    python -m mbq_ref.zoo.train_tiny --resume     # continue after an interruption

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
from tqdm.auto import tqdm

from ..data import BUNDLED, load_corpus
from ..paths import model_dir

__all__ = ["TinyConfig", "train_tokenizer", "train"]


@dataclass
class TinyConfig:
    vocab_size: int = 8192
    hidden_size: int = 256  # multiple of 128: q/k/v/gate/up groups of 128
    intermediate_size: int = 768  # multiple of 128: down_proj groups of 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim 64
    num_key_value_heads: int = 2  # GQA, as in Llama 3
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    # training
    seqlen: int = 512
    batch_size: int = 8
    train_tokens: int = 3_000_000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    save_every: int = 50

    @property
    def steps(self) -> int:
        return self.train_tokens // (self.seqlen * self.batch_size)


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
    """Linear warm-up then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(
    cfg: TinyConfig,
    out: Path,
    resume: bool = False,
    compile: bool = False,
    texts: list[str] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train tokenizer + model into ``out``.

    ``texts`` overrides the bundled train splits and ``stop_after`` simulates an
    interruption after that many steps (both for tests).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "train_state"
    train_texts = texts if texts is not None else [load_corpus(d, "train") for d in BUNDLED]

    if resume and (out / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
        tokenizer.save_pretrained(out)
        print(f"tokenizer: {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s")

    # one token stream, domains interleaved by random windows below
    ids = torch.cat([torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in train_texts])
    print(f"training stream: {ids.numel():,} tokens; {cfg.steps} steps of {cfg.batch_size}x{cfg.seqlen}")

    model = LlamaForCausalLM(_llama_config(cfg, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    step, log = 0, []
    if resume and (state_dir / "state.pt").is_file():
        # weights_only=True: a resume file can never run code when loaded
        st = torch.load(state_dir / "state.pt", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, log = int(st["step"]), json.loads(st["log"])
        torch.set_rng_state(st["rng"])
        print(f"resumed at step {step}")
    params = sum(p.numel() for p in model.parameters())
    fwd = torch.compile(model) if compile else model
    model.train()
    pbar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train tiny-llama")
    t0 = time.time()
    for step in pbar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, ids.numel() - cfg.seqlen - 1, (cfg.batch_size,))
        batch = torch.stack([ids[s : s + cfg.seqlen] for s in starts.tolist()])
        loss = fwd(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(round(loss.item(), 4))
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            state_dir.mkdir(exist_ok=True)
            tmp = state_dir / "state.pt.tmp"
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1, "log": json.dumps(log), "rng": torch.get_rng_state()},
                tmp,
            )
            tmp.replace(state_dir / "state.pt")
        if stop_after is not None and step + 1 >= stop_after:
            return {"stopped_at": step + 1}
    wall = time.time() - t0
    model.eval()
    model.save_pretrained(out)
    info = {
        "config": asdict(cfg),
        "parameters": params,
        "train_stream_tokens": int(ids.numel()),
        "final_loss_mean_last50": float(sum(log[-50:]) / max(1, len(log[-50:]))),
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
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state/state.pt")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (~1.4x faster after ~35 s)")
    ap.add_argument("--train-tokens", type=int, default=TinyConfig.train_tokens)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-only", action="store_true", help="only (re)measure OUT/fp_perplexity.json")
    args = ap.parse_args(argv)
    cfg = TinyConfig(train_tokens=args.train_tokens, seed=args.seed)
    out = args.out or model_dir("tiny-llama")
    if not args.measure_only:
        info = train(cfg, out, resume=args.resume, compile=args.compile)
        print(f"done: {info['parameters']:,} parameters, final loss {info['final_loss_mean_last50']:.3f}")
    for name, r in measure_reference(out)["ppl"].items():
        print(f"FP perplexity {name}: {r['ppl']:.3f} ({r['windows']} windows)")


if __name__ == "__main__":
    main()
