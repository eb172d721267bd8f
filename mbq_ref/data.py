"""Text corpora and calibration samplers.

Two kinds of dataset share one entry point, :func:`load_corpus`:

* **bundled** (offline, in ``data/corpus``): ``austen``, ``bible``,
  ``shakespeare``, each with ``train`` / ``validation`` / ``test`` splits.
  They play the roles of the paper's WikiText-2 / C4 / PTB (Sec. 5.1).
* **hub** (needs network): ``wikitext2``, ``c4``, ``ptb`` with the exact
  configs used by GPTQ and OmniQuant (``datautils.py`` in both repos), so
  numbers from a GPU run are comparable with published tables.

Every loader returns the split as one string. Joining follows GPTQ: WikiText-2
and our bundled corpora join paragraphs with ``"\\n\\n"``, PTB joins sentences
with ``" "``, C4 validation uses the first 1100 documents joined with ``" "``.
"""

from __future__ import annotations

import os


import torch

from .errors import MBQError

from .paths import corpus_dir

__all__ = [
    "BUNDLED",
    "HUB",
    "DATASETS",
    "load_corpus",
    "tokenize_corpus",
    "calibration_windows",
    "CorpusError",
]

BUNDLED = ("austen", "bible", "shakespeare")
HUB = ("wikitext2", "c4", "ptb")
DATASETS = BUNDLED + HUB
SPLITS = ("train", "validation", "test")


class CorpusError(MBQError):
    """A dataset name, split or file that cannot be used (message says why and how to fix it)."""


def _check(name: str, split: str) -> None:
    if name not in DATASETS:
        raise CorpusError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r} for {name}; choose one of {', '.join(SPLITS)}")


def _read_paragraphs(path) -> list[str]:
    """The non-blank paragraphs of a UTF-8 text file: blocks separated by a blank line (``"\\n\\n"``).

    The same split as ``datasets.load_dataset("text", sample_by="paragraph")`` (universal newlines, then
    ``"\\n\\n"``; ``tests/test_data.py`` checks they agree on every bundled file) without its cache, so a
    read-only ``HF_HOME`` / ``HF_DATASETS_CACHE`` does not matter.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {exc.start}); rebuild it with "
                          "`python data/prepare.py` or save it as UTF-8")  # fmt: skip
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path} ({exc.strerror or exc}); check its permissions") from exc
    return [t for t in text.split("\n\n") if t.strip()]


def _load_bundled(name: str, split: str) -> str:
    path = corpus_dir() / name / f"{split}.txt"
    if not path.is_file():
        raise CorpusError(f"missing bundled file {path}; rebuild it with `python data/prepare.py`")
    paragraphs = _read_paragraphs(path)
    if not paragraphs:
        raise CorpusError(f"bundled file {path} is empty; rebuild it with `python data/prepare.py`")
    return "\n\n".join(paragraphs)


def _load_hub(name: str, split: str) -> str:
    """The GPTQ/OmniQuant data recipes. Needs network access to the HF hub."""
    import datasets

    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(ds["sentence"])
        # c4: GPTQ takes one train shard for calibration and the first 1100
        # documents of one validation shard for evaluation.
        if split == "train":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        key = next(iter(files))
        ds = datasets.load_dataset("allenai/c4", data_files=files, split=key)
        texts = ds["text"] if split == "train" else ds["text"][:1100]
        return " ".join(texts)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix attached
        hint = (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so hub datasets cannot be fetched"
            if offline
            else "the Hugging Face hub could not be reached"
        )
        raise CorpusError(
            f"cannot load {name!r} ({hint}: {type(exc).__name__}); use a bundled corpus "
            f"({', '.join(BUNDLED)}) or run online with the offline variables unset"
        ) from exc


def load_corpus(name: str, split: str = "test") -> str:
    """Return one split of a dataset as a single string.

    Args:
        name: one of :data:`DATASETS`.
        split: ``train``, ``validation`` or ``test`` (PTB/WikiText-2 have all
            three; C4 maps ``test`` and ``validation`` to GPTQ's validation slice).
    """
    _check(name, split)
    return _load_bundled(name, split) if name in BUNDLED else _load_hub(name, split)


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole split into one 1-D ``LongTensor`` without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)




def calibration_windows(ids: torch.Tensor, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens (GPTQ's sampler).

    The paper preset is 128 x 2048 tokens of WikiText-2 train (App. C.1).

    Args:
        ids: ``[N]`` token ids of a whole split.
    Returns:
        ``[nsamples, seqlen]`` LongTensor; the same seed gives the same windows.
    """
    if ids.ndim != 1:
        raise CorpusError(f"expected a 1-D token tensor, got shape {tuple(ids.shape)}")
    if nsamples < 1 or seqlen < 2:
        raise CorpusError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    if ids.numel() <= seqlen:
        raise CorpusError(
            f"corpus has {ids.numel()} tokens, too short for windows of {seqlen}; use a shorter seqlen or a bigger split"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
