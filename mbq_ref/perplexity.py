"""Perplexity, following the GPTQ / OmniQuant protocol.

The whole test split is tokenized as one stream, cut into non-overlapping
windows of ``seqlen`` tokens (the ragged tail is dropped), and

    PPL = exp( sum_windows sum_t NLL_t / (n_windows * (seqlen - 1)) )

HF's ``labels=`` loss averages over the ``seqlen - 1`` predicted tokens of each
window, so every window has the same weight. (GPTQ multiplies that mean by
``seqlen``; the factor cancels.) The paper's tables use seqlen 2048 on
WikiText-2 / C4; our tiny model's context is 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .errors import MBQError

__all__ = ["perplexity", "PerplexityResult", "windows", "EvalError", "NonFiniteError"]


class EvalError(MBQError):
    """An evaluation request that cannot be run (too-long seqlen, too-short data)."""


class NonFiniteError(EvalError, FloatingPointError):
    """The model produced NaN/inf logits: its numbers are broken (also a ``FloatingPointError``)."""


def _count(v, what: str, allow_none: bool = False) -> None:
    """Refuse anything but a positive integer (``None`` too when ``allow_none``): a count of windows or a batch size."""
    if v is None and allow_none:
        return
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise EvalError(f"{what} must be a positive integer{' or None' if allow_none else ''}, got {v!r}")


def check_token_ids(ids, vocab: int | None, what: str = "ids") -> None:
    """``ids`` must be a 1-D integer tensor of token ids in ``0..vocab-1`` (:func:`mbq_ref.data.tokenize_corpus`)."""
    if not isinstance(ids, torch.Tensor):
        raise EvalError(f"{what} must be a 1-D torch tensor of token ids (mbq_ref.data.tokenize_corpus gives one), "
                        f"got {type(ids).__name__}")  # fmt: skip
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise EvalError(f"{what} must hold integer token ids, got dtype {ids.dtype}; use ids.long()")
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise EvalError(f"{what} hold token ids {int(ids.min())}..{int(ids.max())}, outside the model's vocabulary "
                        f"0..{(vocab or 0) - 1}; tokenize with the model's own tokenizer")  # fmt: skip


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int
    seqlen: int
    window_nll: list[float] = field(default_factory=list, repr=False)

    def __float__(self) -> float:
        return self.ppl


def _context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of a 1-D token stream."""
    if ids.ndim != 1:
        raise EvalError(f"expected a 1-D token tensor, got shape {tuple(ids.shape)}")
    n = ids.numel() // seqlen
    if n == 0:
        raise EvalError(f"test stream has {ids.numel()} tokens, fewer than one window of {seqlen}; lower seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream.

    Args:
        model: a causal LM returning ``.loss`` for ``labels=input_ids``.
        ids: ``[N]`` token ids (see :func:`mbq_ref.data.tokenize_corpus`).
        seqlen: window length; must not exceed the model's context.
        max_windows: evaluate only the first windows (quick looks; ``None`` = all,
            the protocol used for every number in the README).
        batch_size: windows per forward pass.

    Raises:
        EvalError: a bad argument (non-positive counts, ids that are not a 1-D integer tensor inside the
            vocabulary, seqlen too long); NonFiniteError (also a ``FloatingPointError``): NaN/inf logits.
    """
    _count(max_windows, "max_windows", allow_none=True)
    _count(batch_size, "batch_size")
    check_token_ids(ids, getattr(getattr(model, "config", None), "vocab_size", None))
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise EvalError(f"seqlen must be an integer >= 2 (a window predicts its tokens 2..seqlen), got {seqlen!r}")
    ctx = _context_length(model)
    if ctx is not None and seqlen > ctx:
        raise EvalError(f"seqlen {seqlen} exceeds the model's context of {ctx} tokens; use --seqlen {ctx} or less")
    wins = windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    nlls: list[float] = []
    for i in tqdm(range(0, len(wins), batch_size), desc=desc, disable=not progress, leave=False):
        batch = wins[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        # mean NLL of the seqlen-1 predicted tokens, per window
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.size(0), -1).mean(1)
        if not torch.isfinite(nll).all():
            raise NonFiniteError(f"non-finite loss in windows {i}..{i + len(batch) - 1}: the model produced NaN/inf "
                                 "logits; its weights or config hold values that overflow, re-create the checkpoint")  # fmt: skip
        nlls.extend(nll.tolist())
    mean = sum(nlls) / len(nlls)
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_windows=len(nlls), seqlen=seqlen, window_nll=nlls)
