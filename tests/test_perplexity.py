"""Perplexity protocol (GPTQ/OmniQuant) and the bundled model's reference numbers."""

import json
import math

import pytest
import torch

from mbq_ref.data import BUNDLED, load_corpus, tokenize_corpus
from mbq_ref.paths import model_dir
from mbq_ref.perplexity import EvalError, perplexity, windows


class _Uniform(torch.nn.Module):
    """Predicts every token with probability 1/V: perplexity must be exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"max_position_embeddings": 64})()

    def forward(self, input_ids):
        return type("O", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.p})()


def test_uniform_model_has_perplexity_vocab_size():
    res = perplexity(_Uniform(50), torch.randint(0, 50, (1000,)), seqlen=64, progress=False)
    assert res.n_windows == 1000 // 64
    assert res.ppl == pytest.approx(50, rel=1e-5) and res.nll == pytest.approx(math.log(50), rel=1e-6)


def test_windows_are_non_overlapping_and_drop_the_tail():
    w = windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(torch.arange(10), 3, max_windows=2).shape == (2, 3)


@pytest.mark.parametrize(
    "n, seqlen, match", [(1000, 65, "exceeds the model's context"), (10, 32, "fewer than one window")],
    ids=["seqlen-over-context", "too-short"],
)
def test_bad_requests(n, seqlen, match):
    with pytest.raises(EvalError, match=match):
        perplexity(_Uniform(8), torch.randint(0, 8, (n,)), seqlen=seqlen, progress=False)


def test_nan_logits_are_reported():
    m = _Uniform(8)
    m.p.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        perplexity(m, torch.randint(0, 8, (200,)), seqlen=32, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_fp_perplexity_reproduces_within_1_percent(tiny_llama, name):
    model, tok = tiny_llama
    ref = json.loads((model_dir() / "fp_perplexity.json").read_text())
    ids = tokenize_corpus(tok, load_corpus(name, "test"))
    res = perplexity(model, ids, seqlen=ref["seqlen"], batch_size=8, progress=False)  # batched: ~2x faster, same windows
    assert res.n_windows == ref["ppl"][name]["windows"]
    assert res.ppl == pytest.approx(ref["ppl"][name]["ppl"], rel=0.01)


def test_readme_quotes_the_measured_reference():
    ref = json.loads((model_dir() / "fp_perplexity.json").read_text())
    readme = (model_dir().parent.parent / "README.md").read_text()
    for name, r in ref["ppl"].items():
        assert f"| `{name}` | {r['tokens']:,} | {r['windows']} | {r['ppl']:.2f} |" in readme


@pytest.mark.parametrize("seqlen", [1, 0, 2.5])
def test_seqlen_below_two_is_refused(seqlen):
    """A window of one token predicts nothing (was a misleading FloatingPointError)."""
    with pytest.raises(EvalError, match="seqlen must be an integer >= 2"):
        perplexity(_Uniform(8), torch.randint(0, 8, (100,)), seqlen=seqlen, progress=False)


class _Vocab(_Uniform):
    def __init__(self, vocab):
        super().__init__(vocab)
        self.config.vocab_size = vocab


@pytest.mark.parametrize(
    "ids, kw, match",
    [
        (None, {"max_windows": 0}, "max_windows"), (None, {"max_windows": -1}, "max_windows"),
        (None, {"max_windows": 2.5}, "max_windows"), (None, {"batch_size": 0}, "batch_size"),
        (None, {"batch_size": -2}, "batch_size"), (None, {"batch_size": True}, "batch_size"),
        (torch.rand(200), {}, "integer token ids"), (list(range(200)), {}, "1-D torch tensor"),
        (torch.arange(200) % 60, {}, "outside the model's vocabulary"), (torch.arange(200) - 1, {}, "outside"),
    ],
    ids=["windows-0", "windows-neg", "windows-float", "batch-0", "batch-neg", "batch-bool",
         "float-ids", "list-ids", "oov-ids", "negative-ids"],
)  # fmt: skip
def test_bad_arguments_are_eval_errors(ids, kw, match):
    """ZeroDivisionError, RuntimeError, ValueError, IndexError, AttributeError before; one EvalError now."""
    ids = torch.arange(200) % 50 if ids is None else ids
    with pytest.raises(EvalError, match=match):
        perplexity(_Vocab(50), ids, seqlen=16, progress=False, **kw)


def test_nan_logits_are_an_eval_error_and_a_floating_point_error():
    from mbq_ref.errors import MBQError
    from mbq_ref.perplexity import NonFiniteError

    model = _Vocab(50)
    with torch.no_grad():
        model.p.fill_(float("nan"))
    with pytest.raises(NonFiniteError) as err:
        perplexity(model, torch.arange(200) % 50, seqlen=16, progress=False)
    assert isinstance(err.value, MBQError) and isinstance(err.value, FloatingPointError)
