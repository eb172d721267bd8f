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
