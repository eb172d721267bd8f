"""Token-by-token generation with a bit budget that may change between tokens (elastic inference, Sec. 4.2).

The point of MoBiQuant is that one loaded model serves any average precision:
switching is a change of router threshold ``τ`` (no weights are reloaded,
no kernel is relaunched, Sec. 4.1/4.2). :func:`generate` shows it on text: a
*schedule* such as ``2:8,6:16`` runs the first 8 new tokens at a 2-bit budget
and tokens 9..16 at 6 bits, with the KV cache kept across the switch.

The bits reported for each token are **measured**: every MoBiLinear counts the
slices its router actually gave the token (:mod:`mbq_ref.mobiroute` ``BitStats``),
and :func:`mbq_ref.mobiquant.average_bits` weights the layers by their size. So
a 3-bit budget shows up as e.g. 2.9 or 3.3 bits for a given token: the routers
spend more on some tokens than on others.

To make that per-token number exact, the prompt minus its last token is
prefilled in one pass, and every new token is produced by a forward pass over
exactly one input token (the previous one), whose routing is what we report.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import MBQError

__all__ = ["GenerateError", "parse_schedule", "bits_at", "TokenStep", "Generation", "generate"]


class GenerateError(MBQError):
    """A generation request that cannot be run (bad schedule, empty prompt, too long)."""


def parse_schedule(spec: str | None) -> list[tuple[float, int]]:
    """Parse ``"BITS:UNTIL,BITS:UNTIL,..."``: ``2:8,6:16`` = 2 bits for new tokens 1..8, 6 bits for 9..16.

    Returns:
        ``[(bits, until), ...]`` with strictly increasing ``until`` (``[]`` for ``None``/``""``).
    """
    if not spec:
        return []
    out: list[tuple[float, int]] = []
    for part in spec.split(","):
        try:
            b, u = part.split(":")
            bits, until = float(b), int(u)
        except ValueError as exc:
            raise GenerateError(
                f"bad schedule entry {part.strip()!r}; write BITS:UNTIL pairs, e.g. --schedule 2:8,6:16"
            ) from exc
        if until < 1 or (out and until <= out[-1][1]):
            raise GenerateError(f"schedule token counts must be positive and increasing, got {spec!r}")
        out.append((bits, until))
    return out


def bits_at(step: int, schedule: list[tuple[float, int]], default: float) -> float:
    """The budget for new token number ``step`` (0-based): the first schedule entry with ``step < until``."""
    for bits, until in schedule:
        if step < until:
            return bits
    return default


@dataclass
class TokenStep:
    """One generated token: its id and text, the budget asked for, the bits its forward pass used."""

    token_id: int
    text: str
    target_bits: float
    measured_bits: float
    switch_seconds: float  # time spent changing the budget before this token (0 if unchanged)


@dataclass
class Generation:
    """Result of :func:`generate`."""

    prompt: str
    prompt_tokens: int
    prompt_bits: float | None  # measured over the prefill pass; None for a one-token prompt (no prefill)
    steps: list[TokenStep] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        """The generated continuation (without the prompt)."""
        return "".join(s.text for s in self.steps)

    def table(self) -> str:
        """A plain-text table: one row per token with target and measured bits."""
        rows = [f"{'#':>3} {'target':>6} {'measured':>8}  token"]
        rows += [f"{i + 1:>3} {s.target_bits:>6.2f} {s.measured_bits:>8.2f}  {s.text!r}" for i, s in enumerate(self.steps)]
        return "\n".join(rows)


def _measured_bits(model: nn.Module) -> float:
    from .mobiquant import average_bits

    return average_bits(model)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    set_bits: Callable[[float], object],
    bits: float = 4.0,
    schedule: list[tuple[float, int]] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> Generation:
    """Generate ``max_new_tokens`` tokens, switching the bit budget between tokens as ``schedule`` says.

    Args:
        model: a MoBiQuant model (its MoBiLinear layers count the bits they use).
        tokenizer: its tokenizer.
        prompt: text to continue (at least one token).
        set_bits: ``f(bits)`` that routes the model at a target average ``bits``
            (e.g. :meth:`mbq_ref.checkpoint.Checkpoint.set_bits`); called only when the budget changes.
        bits: budget outside the schedule (and for the prompt if the schedule is empty).
        schedule: ``[(bits, until), ...]`` from :func:`parse_schedule`; the prompt is
            prefilled at the budget of the first new token.
        temperature: 0 = greedy; otherwise sample from ``softmax(logits / temperature)``,
            restricted to the ``top_k`` most likely tokens if ``top_k > 0``.
    Returns:
        :class:`Generation` with one :class:`TokenStep` per new token.
    """
    from .mobiquant import reset_bit_stats

    schedule = schedule or []
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerateError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenerateError(f"top_k must be an integer >= 0 (0 = all tokens), got {top_k!r}")
    # the tokenizer's own convention: Llama adds BOS, the bundled tiny tokenizer (trained without) adds nothing
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise GenerateError("the prompt is empty; pass some text with --prompt")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:  # e.g. an added token past the embedding: IndexError otherwise
        raise GenerateError(f"the prompt has token id {int(ids.max())}, past the model's vocabulary of {vocab}; "
                            "remove special tokens from the prompt or use the model's own tokenizer")  # fmt: skip
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and ids.shape[1] + max_new_tokens > ctx:
        raise GenerateError(
            f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed the model's context of {ctx}"
        )
    device = next(model.parameters()).device
    ids = ids.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()

    current = bits_at(0, schedule, bits)
    set_bits(current)
    past = None
    # transformers renamed the forward's `past_key_values` argument to `cache` (the old name warns)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt_bits = None
    if ids.shape[1] > 1:
        # prefill all but the last prompt token; the last one is fed alone so that the first new
        # token, like every later one, comes from a single-token forward with its own measured bits
        reset_bit_stats(model)
        out = model(input_ids=ids[:, :-1], use_cache=True)
        past = out.past_key_values
        prompt_bits = _measured_bits(model)
    result = Generation(prompt=prompt, prompt_tokens=int(ids.shape[1]), prompt_bits=prompt_bits)
    nxt = ids[:, -1:]
    for step in tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False):
        want = bits_at(step, schedule, bits)
        switch = 0.0
        if want != current:
            ts = time.perf_counter()
            set_bits(want)  # elastic switch: new thresholds, same weights, same KV cache
            switch = time.perf_counter() - ts
            current = want
        reset_bit_stats(model)
        out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
        past = out.past_key_values
        logits = out.logits[0, -1].float()  # [vocab]
        if not bool(torch.isfinite(logits).all()):  # argmax of NaN is token 0: never print <pad><pad>... as text
            raise GenerateError(f"the model produced NaN/inf logits at new token {step + 1}; its weights or config "
                                "hold values that overflow, re-create the checkpoint")  # fmt: skip
        if temperature > 0:
            # shift first (the top logit becomes 0) and divide in float64 (a Python float such as 1e-300 is not
            # rounded to 0): a tiny temperature (1e-45) then gives -inf for the others, never inf or 0/0 = NaN
            logits = (logits.double() - logits.max()) / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1).cpu()
            tok_id = int(torch.multinomial(probs, 1, generator=gen))
        else:
            tok_id = int(logits.argmax())
        text = tokenizer.decode([tok_id])
        result.steps.append(TokenStep(tok_id, text, float(current), _measured_bits(model), switch))
        nxt = torch.tensor([[tok_id]], device=device)
    result.seconds = time.perf_counter() - t0
    return result
