"""Bundled corpora, hub fallbacks and the calibration sampler (mbq_ref/data.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("content", [b"", b"\xff\xfe caf\xe9 \x80\n\nmore"], ids=["0-byte", "not-utf8"])
@pytest.mark.parametrize("split", ["test", "train"])
def test_empty_or_non_utf8_file_is_refused(monkeypatch, tmp_path, content, split):
    """A 0-byte or non-UTF-8 corpus file used to raise DatasetGenerationError; now a one-line CorpusError."""
    (tmp_path / "corpus" / "austen").mkdir(parents=True)
    (tmp_path / "corpus" / "austen" / f"{split}.txt").write_bytes(content)
    monkeypatch.setenv("MBQ_DATA_DIR", str(tmp_path))
    with pytest.raises(CorpusError, match="empty|not UTF-8"):
        load_corpus("austen", split)


@settings(max_examples=40, deadline=None)
@given(paras=st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=8),
       sep=st.sampled_from(["\n\n", "\r\n\r\n", "\n\n\n", "\n \n"]))  # fmt: skip
def test_paragraphs_match_the_datasets_text_loader(tmp_path_factory, paras, sep):
    """Our reader splits paragraphs exactly like datasets' text loader (the loader it replaced), without a cache."""
    import datasets

    from mbq_ref.data import _read_paragraphs

    datasets.disable_progress_bars()
    path = tmp_path_factory.mktemp("para") / "f.txt"
    path.write_bytes(sep.join(paras).encode("utf-8"))
    ours = _read_paragraphs(path)
    if not ours:  # nothing but blank lines: datasets refuses such a file ("no data"), load_corpus says "empty"
        assert not "".join(paras).strip()
        return
    ds = datasets.load_dataset("text", data_files={"t": str(path)}, sample_by="paragraph", split="t",
                               cache_dir=str(path.parent / "cache"))  # fmt: skip
    assert ours == [t for t in ds["text"] if t.strip()]


def test_read_only_hf_cache_does_not_matter(monkeypatch):
    """HF_HOME / HF_DATASETS_CACHE on a read-only filesystem used to raise OSError while loading a bundled corpus."""
    from helpers import small_mount

    with small_mount(ro=True) as ro:
        monkeypatch.setenv("HF_HOME", str(ro))
        monkeypatch.setenv("HF_DATASETS_CACHE", str(ro / "datasets"))
        assert len(load_corpus("austen", "test")) > 100_000


def test_data_dir_that_is_a_file_is_named(monkeypatch, tmp_path):
    from mbq_ref.paths import DataDirError

    f = tmp_path / "data.txt"
    f.write_text("x")
    monkeypatch.setenv("MBQ_DATA_DIR", str(f))
    with pytest.raises(DataDirError, match="is a file, not a folder"):
        load_corpus("austen", "test")
