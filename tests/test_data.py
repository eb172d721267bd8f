"""Bundled corpora, hub fallbacks and the calibration sampler (mbq_ref/data.py)."""

import pytest
import torch

from mbq_ref.data import BUNDLED, CorpusError, calibration_windows, load_corpus, tokenize_corpus


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_splits_load_offline_and_are_disjoint(name):
    splits = {s: load_corpus(name, s) for s in ("train", "validation", "test")}
    for text in splits.values():
        assert len(text) > 100_000 and "\n\n" in text
    # held-out works: a long test paragraph never appears in train
    probe = max(splits["test"].split("\n\n")[5:50], key=len)[:200]
    assert probe in splits["test"] and probe not in splits["train"]


@pytest.mark.parametrize(
    "name, split, match",
    [("wikitext3", "test", "unknown dataset"), ("austen", "dev", "unknown split")],
    ids=["bad-name", "bad-split"],
)
def test_bad_names(name, split, match):
    with pytest.raises(CorpusError, match=match):
        load_corpus(name, split)


def test_hub_dataset_offline_fails_fast_with_fix(monkeypatch):
    """Offline, a hub dataset is refused without trying the network (no connection, so no wait for a timeout)."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("load_corpus tried to open a network connection while offline")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(CorpusError, match="OFFLINE is set.*use a bundled corpus"):
        load_corpus("wikitext2", "test")


def test_missing_bundled_file_names_the_fix(monkeypatch, tmp_path):
    (tmp_path / "corpus" / "austen").mkdir(parents=True)
    monkeypatch.setenv("MBQ_DATA_DIR", str(tmp_path))
    with pytest.raises(CorpusError, match="prepare.py"):
        load_corpus("austen", "test")


def test_calibration_windows_seeded_and_in_bounds():
    ids = torch.arange(1000)
    a = calibration_windows(ids, nsamples=7, seqlen=33, seed=3)
    b = calibration_windows(ids, nsamples=7, seqlen=33, seed=3)
    c = calibration_windows(ids, nsamples=7, seqlen=33, seed=4)
    assert a.shape == (7, 33) and torch.equal(a, b) and not torch.equal(a, c)
    # each window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(7, 32, dtype=torch.long))


@pytest.mark.parametrize(
    "ids, kw, match",
    [
        (torch.arange(10), dict(seqlen=10), "too short"),
        (torch.arange(100).view(10, 10), dict(seqlen=4), "1-D"),
        (torch.arange(100), dict(seqlen=4, nsamples=0), "nsamples"),
    ],
    ids=["too-short", "2-D", "zero-samples"],
)
def test_calibration_windows_bad_input(ids, kw, match):
    with pytest.raises(CorpusError, match=match):
        calibration_windows(ids, **kw)


def test_tokenize_corpus_is_1d_long(tiny_tokenizer):
    ids = tokenize_corpus(tiny_tokenizer, "It is a truth universally acknowledged.")
    assert ids.ndim == 1 and ids.dtype == torch.long and ids.numel() > 3


def test_empty_bundled_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "corpus" / "bible").mkdir(parents=True)
    (tmp_path / "corpus" / "bible" / "test.txt").write_text("\n\n \n")
    monkeypatch.setenv("MBQ_DATA_DIR", str(tmp_path))
    with pytest.raises(CorpusError, match="empty"):
        load_corpus("bible", "test")
