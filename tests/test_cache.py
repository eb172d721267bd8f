"""mbq_ref.cache: entries are reused for the same key and code, rebuilt when either changes."""

import json

import pytest

from mbq_ref import cache


def _builder(calls):
    def build(folder):
        calls.append(folder)
        (folder / "value.txt").write_text(str(len(calls)))

    return build


def test_same_key_is_built_once(tmp_path):
    calls = []
    a = cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    b = cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    assert a == b and len(calls) == 1
    assert (a / "value.txt").read_text() == "1"


def test_other_settings_rebuild_and_replace_the_stale_entry(tmp_path):
    calls = []
    a = cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    b = cache.cached("entry", {"bits": 4}, _builder(calls), root=tmp_path)
    assert a != b and len(calls) == 2
    assert not a.exists() and b.exists()  # one entry per name: the stale one is removed
    other = cache.cached("entry-two", {"bits": 3}, _builder(calls), root=tmp_path)
    assert b.exists() and other.exists()  # a longer name is another entry, not a stale one


def test_code_change_rebuilds(tmp_path, monkeypatch):
    calls = []
    a = cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    monkeypatch.setattr(cache, "code_version", lambda: "another version of the package")
    b = cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    assert a != b and len(calls) == 2
    assert json.loads((b / "cache_key.json").read_text())["code"] == "another version of the package"


def test_code_version_covers_the_package_sources():
    v = cache.code_version()
    assert len(v) == 64 and v == cache.code_version()


def test_damaged_or_interrupted_entries_are_rebuilt(tmp_path):
    calls = []
    a = cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    (a / "cache_key.json").write_text("{not json")
    assert cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path) == a and len(calls) == 2

    def fail(folder):
        (folder / "half.txt").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.cached("broken", {}, fail, root=tmp_path)
    assert not list(tmp_path.glob("broken-*")) and not list(tmp_path.glob(".building-*"))


def test_disabled_cache_always_builds(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "0")
    calls = []
    cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    cache.cached("entry", {"bits": 3}, _builder(calls), root=tmp_path)
    assert len(calls) == 2 and not list(tmp_path.glob("entry-*"))


def test_files_sha256_sees_content(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"abc")
    h = cache.files_sha256([p])
    p.write_bytes(b"abd")
    assert cache.files_sha256([p]) != h


def test_bad_name(tmp_path):
    with pytest.raises(ValueError):
        cache.cached("../x", {}, _builder([]), root=tmp_path)


def test_cached_static_calibrates_once_and_returns_the_same_model(tmp_path, monkeypatch):
    import torch

    from mbq_ref import calibrate
    from mbq_ref.zoo import random_llama

    folder = tmp_path / "model"
    random_llama(hidden=128, layers=1, vocab=64).save_pretrained(folder)
    monkeypatch.setattr(cache, "cache_root", lambda: tmp_path / "cache")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = calibrate.CalibConfig(nsamples=2, seqlen=16, epochs=1, batch_size=2)
    first = cache.cached_static(str(folder), ids, 3, cfg, group_size=128)
    monkeypatch.setattr(calibrate, "calibrate_static", lambda *a, **k: pytest.fail("calibrated again"))
    again = cache.cached_static(str(folder), ids, 3, cfg, group_size=128)
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.equal(first(x).logits, again(x).logits)
    assert len(list((tmp_path / "cache").glob("lwc-w3-*"))) == 1
