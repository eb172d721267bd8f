"""One-file checkpoints, MoBiQuant and static: exact round trip, atomic save, and every refusal (mbq_ref.checkpoint)."""

import json
import math
import os
import pickle
import struct
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import random_llama

from mbq_ref.calibrate import CalibConfig
from mbq_ref.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    ForeignFileError,
    ModelMismatchError,
    TamperedCheckpointError,
    TruncatedCheckpointError,
    VersionMismatchError,
    config_sha256,
    load_checkpoint,
    payload_sha256,
    read_metadata,
    save_checkpoint,
)
from mbq_ref.errors import MBQError
from mbq_ref.fakequant import quantizable_linears
from mbq_ref.mobiquant import MoBiConfig, mobi_layers, quantize_mobiquant, set_slices

TINY = MoBiConfig(calib=CalibConfig(nsamples=2, seqlen=32, epochs=1, batch_size=2, dataset="random"))


@pytest.fixture(scope="module")
def quantized():
    """A 1-layer random Llama, MoBiQuant-calibrated for one step per stage (seconds)."""
    torch.manual_seed(0)
    model = random_llama("llama", layers=1)
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    quantize_mobiquant(model, calib, TINY, progress=False)
    return model


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.mbq.safetensors"
    names = list(mobi_layers(quantized))
    # a 3-row table: base only, one global τ, per-layer logits
    table = {2.0: 1.0, 5.0: 0.5, 8.0: {"logits": {n: -1.0 - i for i, n in enumerate(names)}, "achieved": 7.9}}
    save_checkpoint(quantized, path, {"base_model": "random-llama", "results": {"ppl": 12.5}}, thresholds=table)
    return path


def _x():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# --- round trip --------------------------------------------------------------------------
def test_roundtrip_outputs_identical(quantized, saved):
    ck = load_checkpoint(saved, with_tokenizer=False)
    x = _x()
    # routing as saved (the calibration threshold)
    assert torch.equal(_logits(ck.model, x), _logits(quantized, x))
    # and at every fixed slice count: the integer codes, scales and zeros came back bit-exact
    for k in range(1, 5):
        set_slices(ck.model, k)
        set_slices(quantized, k)
        assert torch.equal(_logits(ck.model, x), _logits(quantized, x)), k
    set_slices(quantized, None)


def test_roundtrip_tensors_and_metadata(quantized, saved):
    ck = load_checkpoint(saved, with_tokenizer=False)
    for name, m in mobi_layers(quantized).items():
        m2 = mobi_layers(ck.model)[name]
        assert torch.equal(m.sliced.codes, m2.sliced.codes) and m2.sliced.codes.dtype == torch.uint8
        assert torch.equal(m.sliced.scale, m2.sliced.scale)
        assert torch.equal(m.sliced.zero, m2.sliced.zero)
        for (k, a), (_, b) in zip(m.router.state_dict().items(), m2.router.state_dict().items()):
            assert torch.equal(a, b), k
    meta = ck.meta
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["base_model"]["id"] == "random-llama"
    assert meta["base_model"]["architecture"] == "LlamaForCausalLM"
    assert meta["base_model"]["config_sha256"] == config_sha256(quantized.config)
    assert meta["quantization"]["slice_bits"] == [2, 2, 2, 2]
    assert meta["quantization"]["cumulative_bits"] == [2, 4, 6, 8]
    assert meta["quantization"]["group_size"] == 128
    assert len(meta["quantization"]["layers"]) == 7
    assert meta["results"] == {"ppl": 12.5}
    assert meta["thresholds"]["targets"] == [2.0, 5.0, 8.0]
    assert read_metadata(saved) == meta


def test_per_layer_train_bits_roundtrip(tmp_path):
    """train_bits = {layer: bits}: the config is stored as JSON and read back, routing unchanged."""
    torch.manual_seed(0)
    model = random_llama("llama", layers=1)
    per = {n: 2.5 + 0.5 * i for i, n in enumerate(quantizable_linears(model))}
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    log = quantize_mobiquant(model, calib, replace(TINY, train_bits=per), progress=False)
    meta = {"base_model": "random", "calibration": {"config": log["config"]}}
    path = save_checkpoint(model, tmp_path / "per.safetensors", meta)
    ck = load_checkpoint(path, with_tokenizer=False)
    assert ck.meta["calibration"]["config"]["train_bits"] == per
    assert ck.meta["calibration"]["config"] == json.loads(json.dumps(log["config"]))
    assert torch.equal(_logits(ck.model, _x()), _logits(model, _x()))


def test_embeddings_stored_once_when_tied(tmp_path):
    model = random_llama("llama", layers=1)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    quantize_mobiquant(model, torch.randint(0, 256, (2, 32)), TINY, progress=False)
    path = save_checkpoint(model, tmp_path / "tied.safetensors", {"base_model": "tied"})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "fp.model.embed_tokens.weight" in keys and "fp.lm_head.weight" not in keys
    ck = load_checkpoint(path, with_tokenizer=False)
    assert ck.meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    x = _x()
    assert torch.equal(_logits(ck.model, x), _logits(model, x))


def test_codes_are_one_byte_per_weight(saved, quantized):
    """Slices 2,2,2,2 = 8 bits: Q_E is dense in a uint8, the file is about 1 byte per quantized weight."""
    from safetensors import safe_open

    n_weights = sum(m.in_features * m.out_features for m in mobi_layers(quantized).values())
    with safe_open(str(saved), "pt") as f:
        code_bytes = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith(".codes"))
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys() if k.endswith((".codes", ".zero")))
    assert code_bytes == n_weights


def test_threshold_table(saved):
    ck = load_checkpoint(saved, with_tokenizer=False)
    names = ck.table.layers
    assert ck.table.logits_for(2.0) == {n: float("inf") for n in names}
    assert ck.table.logits_for(5.0) == {n: 0.0 for n in names}
    assert ck.table.logits_for(8.0) == {n: -1.0 - i for i, n in enumerate(names)}
    # between rows: linear in logit(τ), rows placed at the bits they measured (the 8.0 row: 7.9);
    # an infinite end is replaced by its finite neighbour
    w = (6.5 - 5.0) / (7.9 - 5.0)
    assert ck.table.logits_for(6.5) == pytest.approx({n: w * (-1.0 - i) for i, n in enumerate(names)})
    assert ck.table.logits_for(3.0) == {n: 0.0 for n in names}
    ck.set_bits(8.0)
    assert [m.tau_logit for m in mobi_layers(ck.model).values()] == [-1.0 - i for i in range(len(names))]
    with pytest.raises(CheckpointError, match="bits must be in 2..8"):
        ck.set_bits(8.5)


def test_payload_hash_covers_name_dtype_shape_and_bytes():
    a = {"x": torch.zeros(4, dtype=torch.uint8)}
    assert payload_sha256(a) != payload_sha256({"y": torch.zeros(4, dtype=torch.uint8)})
    assert payload_sha256(a) != payload_sha256({"x": torch.zeros(2, 2, dtype=torch.uint8)})
    assert payload_sha256(a) != payload_sha256({"x": torch.zeros(4, dtype=torch.int8)})
    assert payload_sha256(a) != payload_sha256({"x": torch.tensor([0, 0, 0, 1], dtype=torch.uint8)})


@pytest.fixture(scope="module")
def tok_saved(tmp_path_factory, tiny_tokenizer):
    """A 1-layer random Llama with the bundled tokenizer's vocabulary, saved with that tokenizer embedded."""
    torch.manual_seed(0)
    model = random_llama("llama", layers=1, hidden=64, vocab=len(tiny_tokenizer))
    quantize_mobiquant(model, torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1)),
                       replace(TINY, group_size=64), progress=False)  # fmt: skip
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    return save_checkpoint(model, path, {"base_model": "random"}, tokenizer=tiny_tokenizer, thresholds={2.0: 1.0, 8.0: 0.0})


def test_embedded_tokenizer_roundtrip(quantized, tok_saved, tmp_path, tiny_tokenizer):
    # a tokenizer whose ids run past the model's vocabulary is refused on save (nothing written)
    with pytest.raises(CheckpointError, match="past the model's vocabulary of 256"):
        save_checkpoint(quantized, tmp_path / "no.safetensors", tokenizer=tiny_tokenizer)
    assert not list(tmp_path.iterdir())
    ck = load_checkpoint(tok_saved)
    text = "It is a truth universally acknowledged, that a single man"
    assert ck.tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_save_refuses_unquantized_model(tmp_path):
    with pytest.raises(CheckpointError, match="no MoBiLinear"):
        save_checkpoint(random_llama("llama", layers=1), tmp_path / "x.safetensors")


# --- atomic save ---------------------------------------------------------------------------
def _leftovers(folder: Path, keep: Path):
    return sorted(p.name for p in folder.iterdir() if p != keep)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_interrupted_save_keeps_previous_file(quantized, saved, tmp_path, monkeypatch, where):
    path = tmp_path / "model.safetensors"
    path.write_bytes(saved.read_bytes())
    before = path.read_bytes()
    import safetensors.torch

    if where == "write":
        real = safetensors.torch.save_file

        from safetensors import SafetensorError

        def half_then_fail(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:  # the disk filled up halfway through
                f.truncate(os.path.getsize(filename) // 2)
            # what safetensors really raises on a full disk (measured on a 64 KiB tmpfs): not an OSError
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    else:
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises((CheckpointError, KeyboardInterrupt)):
        save_checkpoint(quantized, path, {"base_model": "changed"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path) == [], "temporary file left behind"
    assert read_metadata(path)["base_model"]["id"] == "random-llama"


def test_save_replaces_existing_file_and_creates_folder(quantized, tmp_path):
    path = tmp_path / "sub" / "dir" / "m.safetensors"
    save_checkpoint(quantized, path, {"base_model": "first"})
    save_checkpoint(quantized, path, {"base_model": "second"})
    assert read_metadata(path)["base_model"]["id"] == "second"
    assert _leftovers(path.parent, path) == []
    assert path.stat().st_mode & 0o044, "file should be readable like any other output"


# --- refusals ------------------------------------------------------------------------------
def _split(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _rewrite_meta(src: Path, dst: Path, edit, rehash: bool) -> Path:
    from mbq_ref.checkpoint.format import _meta_sha256

    header, data = _split(src)
    md = header["__metadata__"]
    meta = json.loads(md["mbq_meta"])
    edit(meta)
    md["mbq_meta"] = json.dumps(meta)
    if rehash:  # a careful forger also fixes the metadata hash
        md["meta_sha256"] = _meta_sha256(md["mbq_meta"], md.get("tokenizer", ""))
    dst.write_bytes(_join(header, data))
    return dst


@pytest.mark.parametrize("keep", [0, 5, 12, 0.5, -1], ids=["empty", "5B", "header", "half", "minus1B"])
def test_truncated_file_refused(saved, tmp_path, keep):
    raw = saved.read_bytes()
    n = {0.5: len(raw) // 2, -1: len(raw) - 1}.get(keep, keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[:n])
    with pytest.raises(TruncatedCheckpointError, match="truncated|bytes"):
        load_checkpoint(bad)


def test_tampered_tensor_bytes_refused(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    raw[-100] ^= 0x01  # one bit of one stored weight
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(raw))
    read_metadata(bad)  # the header is intact ...
    with pytest.raises(TamperedCheckpointError, match="payload SHA-256 mismatch"):
        load_checkpoint(bad)  # ... the payload is not


def test_edited_metadata_refused(saved, tmp_path):
    bad = _rewrite_meta(saved, tmp_path / "edit.safetensors", lambda m: m["results"].update(ppl=1.0), rehash=False)
    with pytest.raises(TamperedCheckpointError, match="metadata SHA-256 mismatch"):
        load_checkpoint(bad)


def test_forged_payload_hash_still_refused(saved, tmp_path):
    """Rewriting the metadata consistently does not help if the payload hash no longer matches the tensors."""
    bad = _rewrite_meta(saved, tmp_path / "forged.safetensors", lambda m: m.update(payload_sha256="0" * 64), rehash=True)
    with pytest.raises(TamperedCheckpointError, match="payload"):
        load_checkpoint(bad)


def test_version_mismatch_refused(saved, tmp_path):
    bad = _rewrite_meta(saved, tmp_path / "v2.safetensors", lambda m: m.update(format_version=FORMAT_VERSION + 1), rehash=True)
    with pytest.raises(VersionMismatchError, match=f"version {FORMAT_VERSION + 1}"):
        load_checkpoint(bad)
    odd = _rewrite_meta(saved, tmp_path / "vlist.safetensors", lambda m: m.update(format_version=[1]), rehash=True)
    with pytest.raises(VersionMismatchError, match=r"version \[1\], this mbq-ref"):  # not a version at all
        load_checkpoint(odd)


def test_version_1_checkpoint_refused_with_one_line_reason(saved, tmp_path):
    # version 1 stored the MoBiSlice zero point on the base grid; reading its codes with today's rule would be wrong
    old = _rewrite_meta(saved, tmp_path / "v1.safetensors", lambda m: m.update(format_version=1), rehash=True)
    with pytest.raises(VersionMismatchError, match="version 1 .*zero point.*reads version 2") as exc:
        load_checkpoint(old)
    assert "\n" not in str(exc.value)


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(ForeignFileError, match="not an mbq-ref MoBiQuant checkpoint"):
        load_checkpoint(plain)


def test_non_safetensors_files_refused_without_unpickling(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text, long enough to have an 8-byte prefix\n")
    with pytest.raises(ForeignFileError, match="not a safetensors file"):
        load_checkpoint(text)
    # a pickle whose loading would run code: we must refuse it without ever unpickling
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(ForeignFileError):
        load_checkpoint(evil)
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_missing_file_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_other_model_refused(saved, quantized):
    other = random_llama("qwen2", layers=1)
    with pytest.raises(ModelMismatchError, match="made for 'random-llama'"):
        load_checkpoint(saved, expect_model=other)
    wider = random_llama("llama", hidden=256, layers=1)
    with pytest.raises(ModelMismatchError):
        load_checkpoint(saved, expect_model=wider.config)
    # the same architecture, however it was loaded, is accepted
    load_checkpoint(saved, expect_model=random_llama("llama", layers=1, seed=5), with_tokenizer=False)
    load_checkpoint(saved, expect_model="random-llama", with_tokenizer=False)


def test_other_model_by_name_refused(saved):
    with pytest.raises(ModelMismatchError):
        load_checkpoint(saved, expect_model="tiny-llama")


def test_every_refusal_is_an_mbq_error():
    for cls in (TruncatedCheckpointError, TamperedCheckpointError, ForeignFileError, VersionMismatchError, ModelMismatchError):
        assert issubclass(cls, CheckpointError) and issubclass(cls, MBQError)


# --- cross-checks: edits with both hashes recomputed (integrity hashes are not signatures) ------
def _set(path: str, value):
    """An edit of mbq_meta: set the field at a dotted path (list indices as numbers) to ``value``."""

    def edit(meta):
        *parents, last = path.split(".")
        d = meta
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return edit


def _slices(bits):
    def edit(meta):
        q = meta["quantization"]
        q["slice_bits"] = bits
        q["cumulative_bits"] = [sum(bits[: i + 1]) for i in range(len(bits))]

    return edit


HEADER_EDITS = {
    # a reported case: slices and cumulative bits edited consistently, 8-bit codes unchanged
    "slices-3333": (_slices([3, 3, 3, 3]), "does not fit 12-bit codes"),
    "slices-2221": (_slices([2, 2, 2, 1]), "outside 0..127"),
    "slices-2.5": (_slices([2.5, 2, 2, 1.5]), "slice_bits"),
    "cumulative-empty": (_set("quantization.cumulative_bits", []), "disagrees with slice_bits"),
    "cumulative-string": (_set("quantization.cumulative_bits", "2468"), "disagrees with slice_bits"),
    "cumulative-wrong": (_set("quantization.cumulative_bits", [2, 4, 6, 9]), "disagrees with slice_bits"),
    "group-0": (_set("quantization.group_size", 0), "group_size must be an integer"),
    "group-float": (_set("quantization.group_size", 128.0), "group_size must be an integer"),
    "group-string": (_set("quantization.group_size", "128"), "group_size must be an integer"),
    "group-7": (_set("quantization.group_size", 7), "does not divide"),
    "group-64": (_set("quantization.group_size", 64), "scale has shape"),
    "context-string": (_set("base_model.config.max_position_embeddings", "256"), "max_position_embeddings must be an integer"),
    "hidden-act": (_set("base_model.config.hidden_act", "no_such_activation"), "hidden_act"),
    "vocab-1e7": (_set("base_model.config.vocab_size", 10**7), "vocab_size must be an integer"),
    "vocab-float": (_set("base_model.config.vocab_size", 1e7), "vocab_size must be an integer"),
    "vocab-257": (_set("base_model.config.vocab_size", 257), "config_sha256 does not match"),
    "targets-string": (_set("thresholds.targets", "abc"), "list of numbers"),
    "targets-unsorted": (_set("thresholds.targets", [8.0, 5.0, 2.0]), "strictly increasing"),
    "targets-nan": (_set("thresholds.targets", [2.0, float("nan"), 8.0]), "finite"),
    "targets-moved": (_set("thresholds.targets", [2.0, 4.0, 8.0]), "disagree with the metadata"),
    "layer-shape": (_set("quantization.layers.0.shape", [64, 128]), "codes are"),
    "layers-empty": (_set("quantization.layers", []), "non-empty list"),
    "dtype": (_set("base_model.dtype", "load"), "base_model.dtype"),
    "code-dtype": (_set("quantization.code_dtype", "int32"), "expected uint8"),
    "router-hidden": (_set("quantization.router_hidden", 3), "router fc1"),
}


@pytest.mark.parametrize("edit,match", list(HEADER_EDITS.values()), ids=list(HEADER_EDITS))
def test_consistent_header_edits_refused(saved, tmp_path, edit, match):
    """Fields that disagree with each other or with the tensors are refused even when the hashes were recomputed."""
    bad = _rewrite_meta(saved, tmp_path / "edited.safetensors", edit, rehash=True)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad, with_tokenizer=False)


def _rewrite_tensors(src: Path, dst: Path, edit) -> Path:
    """Edit the tensors and recompute both hashes, as a careful forger would."""
    from safetensors.torch import load_file, save_file

    from mbq_ref.checkpoint.format import _meta_sha256

    header, _ = _split(src)
    md = dict(header["__metadata__"])
    tensors = load_file(str(src))
    edit(tensors)
    meta = json.loads(md["mbq_meta"])
    meta["payload_sha256"] = payload_sha256(tensors)
    md["mbq_meta"] = json.dumps(meta)
    md["meta_sha256"] = _meta_sha256(md["mbq_meta"], md.get("tokenizer", ""))
    save_file(tensors, str(dst), metadata=md)
    return dst


def _layer0(saved):
    return json.loads(_split(saved)[0]["__metadata__"]["mbq_meta"])["quantization"]["layers"][0]["name"]


def _fill(key, value, index=(0, 0)):
    def edit(t):
        t[key] = t[key].clone()
        t[key][index] = value

    return edit


TENSOR_EDITS = {
    "scale-nan": ("q.{L}.scale", lambda k: _fill(k, float("nan")), "NaN/inf"),
    "scale-negative": ("q.{L}.scale", lambda k: _fill(k, -1.0), "<= 0"),
    "zero-fraction": ("q.{L}.zero", lambda k: (lambda t: t.update({k: t[k].float() + 0.5})), "not integers"),
    "zero-inf": ("q.{L}.zero", lambda k: (lambda t: t.update({k: t[k].float() + float("inf")})), "NaN/inf"),
    "codes-int32-300": ("q.{L}.codes", lambda k: (lambda t: t.update({k: t[k].int() + 300})), "codes are"),
    "thresholds-nan": ("thresholds.tau_logit", lambda k: _fill(k, float("nan")), "NaN"),
    "tau-nan": ("q.{L}.tau_logit", lambda k: (lambda t: t.update({k: torch.tensor(float("nan"), dtype=torch.float64)})), "NaN"),
    "router-inf": ("q.{L}.router.fc1.weight", lambda k: _fill(k, float("inf")), "NaN/inf"),
    "embedding-nan": ("fp.model.embed_tokens.weight", lambda k: _fill(k, float("nan")), "NaN/inf"),
    "extra-tensor": ("extra", lambda k: (lambda t: t.update({"q.extra": torch.zeros(1)})), "unexpected tensors"),
    "targets-tensor": ("thresholds.targets", lambda k: _fill(k, 3.0, 0), "disagree with the metadata"),
    "scale-shape": ("q.{L}.scale", lambda k: (lambda t: t.update({k: t[k][:, :1].repeat(1, 2)})), "scale has shape"),
}


@pytest.mark.parametrize("key,make,match", list(TENSOR_EDITS.values()), ids=list(TENSOR_EDITS))
def test_consistent_tensor_edits_refused(saved, tmp_path, key, make, match):
    """Tensors rewritten with both hashes recomputed: out-of-domain values are refused, not evaluated."""
    key = key.replace("{L}", _layer0(saved))
    bad = _rewrite_tensors(saved, tmp_path / "edited.safetensors", make(key))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad, with_tokenizer=False)


def test_plausible_forgery_is_not_detected(saved, tmp_path):
    """What the hashes cannot do (docs/robustness.md): a forger who recomputes them can change values within
    their valid domain (here every scale x100) and the file loads. Integrity, not authenticity."""
    key = f"q.{_layer0(saved)}.scale"
    forged = _rewrite_tensors(saved, tmp_path / "forged.safetensors", lambda t: t.update({key: t[key] * 100}))
    ck = load_checkpoint(forged, with_tokenizer=False)
    assert not torch.equal(_logits(ck.model, _x()), _logits(load_checkpoint(saved, with_tokenizer=False).model, _x()))


def _header_metadata(saved, dst: Path, md) -> Path:
    header, data = _split(saved)
    header["__metadata__"] = md
    dst.write_bytes(_join(header, data))
    return dst


@pytest.mark.parametrize("md", [[1, 2], "a string", {"format": FORMAT, "mbq_meta": 5}], ids=["list", "string", "non-string"])
def test_header_metadata_of_wrong_type_refused(saved, tmp_path, md):
    bad = _header_metadata(saved, tmp_path / "md.safetensors", md)
    with pytest.raises(ForeignFileError, match="must map strings to strings"):
        read_metadata(bad)


def test_metadata_not_an_object_refused(saved, tmp_path):
    from mbq_ref.checkpoint.format import _meta_sha256

    header, _ = _split(saved)
    md = dict(header["__metadata__"], mbq_meta="[1, 2]")
    md["meta_sha256"] = _meta_sha256(md["mbq_meta"], md.get("tokenizer", ""))
    with pytest.raises(TamperedCheckpointError, match="not an object"):
        read_metadata(_header_metadata(saved, tmp_path / "list.safetensors", md))


def test_lone_surrogate_in_header_refused(saved, tmp_path):
    header, _ = _split(saved)
    md = dict(header["__metadata__"])
    md["mbq_meta"] = md["mbq_meta"].replace('"random-llama"', '"random-llama\ud800"')
    with pytest.raises(TamperedCheckpointError, match="not valid Unicode"):
        read_metadata(_header_metadata(saved, tmp_path / "surrogate.safetensors", md))


def test_broken_embedded_tokenizer_refused(tok_saved, tmp_path):
    from mbq_ref.checkpoint.format import _meta_sha256

    good = tok_saved
    header, data = _split(good)
    md = header["__metadata__"]
    files = json.loads(md["tokenizer"])
    name = next(n for n in files if n.endswith("tokenizer.json"))
    files[name] = files[name][: len(files[name]) // 2]  # cut in the middle: not JSON any more
    md["tokenizer"] = json.dumps(files)
    md["meta_sha256"] = _meta_sha256(md["mbq_meta"], md["tokenizer"])
    bad = tmp_path / "badtok.safetensors"
    bad.write_bytes(_join(header, data))
    with pytest.raises(TamperedCheckpointError, match="tokenizer does not load"):
        load_checkpoint(bad)


def test_unreadable_file_refused(saved):
    """A file without read permission: one line, not a PermissionError traceback. Root reads anything,
    so when run as root the check runs in a forked child that drops to the unprivileged user `nobody`."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mbq-perm-"))  # outside pytest's 0700 folders: `nobody` may enter it
    try:
        folder.chmod(0o755)
        bad = folder / "secret.safetensors"
        bad.write_bytes(saved.read_bytes())
        bad.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(CheckpointError, match="cannot read"):
                read_metadata(bad)
            return
        pid = os.fork()
        if pid == 0:  # child: no pytest machinery, report through the exit status only
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                read_metadata(bad)
                code = 1  # read although unreadable
            except CheckpointError as exc:
                code = 0 if "cannot read" in str(exc) and "chmod" in str(exc) else 2
            except BaseException:
                code = 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child: 1 = read anyway, 2 = wrong message, 4 = other exception"
    finally:
        shutil.rmtree(folder)


def test_symlink_loop_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        load_checkpoint(a)


def test_full_disk_save_is_a_clear_error(quantized, saved):
    """A real full filesystem: safetensors raises SafetensorError (not OSError); it becomes a CheckpointError."""
    from helpers import small_mount

    from mbq_ref.checkpoint import CheckpointWriteError

    with small_mount(size=256 * 1024) as mnt:
        target = mnt / "m.safetensors"
        with pytest.raises(CheckpointWriteError, match="disk is full"):
            save_checkpoint(quantized, target, {"base_model": "x"})
        assert sorted(p.name for p in mnt.iterdir()) == [], "temporary file left behind"


def test_read_only_save_is_a_clear_error(quantized):
    from helpers import small_mount

    with small_mount(ro=True) as mnt:
        for target in (mnt / "m.safetensors", mnt / "new" / "m.safetensors"):
            with pytest.raises(CheckpointError, match="read-only"):
                save_checkpoint(quantized, target)


# --- static per-bit checkpoints (the baseline) ----------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "lwc"])
def test_static_checkpoint_roundtrip(tmp_path, method):
    from mbq_ref.checkpoint import load_static_checkpoint, save_static_checkpoint
    from mbq_ref.fakequant import quantize_model

    model = quantize_model(random_llama("qwen2", layers=1), bits=3, group_size=128, method=method)
    if method == "lwc":  # move the clip factors off their initial value
        for m in model.modules():
            if getattr(m, "clip", None) is not None:
                torch.nn.init.uniform_(m.clip.gamma, 1.0, 4.0)
    path = save_static_checkpoint(model, tmp_path / "w3.safetensors", {"base_model": "random-qwen2"})
    ck = load_static_checkpoint(path, expect_model=model)
    assert ck.meta["quantization"]["bits"] == 3 and ck.meta["quantization"]["method"] == method
    x = _x()
    assert torch.equal(_logits(ck.model, x), _logits(model, x))
    # a static file is not a MoBiQuant checkpoint, and vice versa
    with pytest.raises(ForeignFileError, match="mbq-ref/static"):
        load_checkpoint(path)


def test_static_checkpoint_stores_bitplanes_and_refuses_byte_stream_versions(tmp_path):
    """Codes are the bit-planes of cuda_numba.packing (one packer); files of the byte-stream versions 1-2 are refused."""
    from cuda_numba.packing import pack_bitplanes_ref
    from safetensors import safe_open

    from mbq_ref.checkpoint import STATIC_FORMAT_VERSION, load_static_checkpoint, save_static_checkpoint
    from mbq_ref.fakequant import quant_linears, quantize_model
    from mbq_ref.quantizer import quantize, scale_zero

    model = quantize_model(random_llama("llama", layers=1), bits=3, group_size=128)
    path = save_static_checkpoint(model, tmp_path / "w3.safetensors")
    name, m = next(iter(quant_linears(model).items()))
    with torch.no_grad():
        s, z = scale_zero(*m.clip_range(), 3, ste=False)
        want = pack_bitplanes_ref(quantize(m.weight, s, z, 3, m.group_size).numpy(), 3)  # uint32 [3, N, K/32]
    with safe_open(str(path), "pt") as f:
        got = f.get_tensor(f"q.{name}.codes")
    assert got.dtype == torch.uint32 and torch.equal(got, torch.from_numpy(want))
    for version in (1, 2):
        old = _rewrite_meta(path, tmp_path / f"v{version}.safetensors", lambda meta, v=version: meta.update(format_version=v), rehash=True)
        with pytest.raises(VersionMismatchError, match=f"version {version} packed the codes as one byte stream.*reads version {STATIC_FORMAT_VERSION}") as exc:
            load_static_checkpoint(old)
        assert "\n" not in str(exc.value)


def test_static_file_is_smaller_per_width(saved, tmp_path, quantized):
    """Bit-plane codes: a 2-bit static file stores a quarter of the code bytes of the 8-bit MoBiQuant file."""
    from safetensors import safe_open

    from mbq_ref.checkpoint import save_static_checkpoint
    from mbq_ref.fakequant import quantize_model

    path = save_static_checkpoint(quantize_model(random_llama("llama", layers=1), bits=2), tmp_path / "w2.safetensors")
    with safe_open(str(path), "pt") as f:
        static_codes = sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith(".codes"))
    with safe_open(str(saved), "pt") as f:
        mobi_codes = sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith(".codes"))
    assert static_codes * 4 == mobi_codes


# --- fuzzing the header: a load gives the original model or a CheckpointError, nothing else ------
def _leaves(obj, prefix=()):
    """Every field path of a JSON value (dict keys and list indices), containers included."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _leaves(v, (*prefix, i))
    return out


def _json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 2, 3, 7, 8, 64, 128, 256, 10**7])
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.sampled_from(["2468", "abc", "silu", "F16", "\ud800"])
    )  # fmt: skip
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


def _edit_at(obj, path, value, delete):
    *parents, last = path
    for p in parents:
        obj = obj[p]
    if delete:
        del obj[last]
    else:
        obj[last] = value


@pytest.fixture(scope="module")
def fuzz_base(saved, quantized):
    header, data = _split(saved)
    meta = json.loads(header["__metadata__"]["mbq_meta"])
    orig = load_checkpoint(saved, with_tokenizer=False)
    paths = [("meta", *p) for p in _leaves(meta)] + [("index", *p) for p in _leaves({k: v for k, v in header.items() if k != "__metadata__"})]
    paths += [("header", k) for k in header["__metadata__"]]
    return header, data, meta, orig, _logits(orig.model, _x()), paths


def test_fuzzed_header_loads_the_original_or_is_refused(fuzz_base, tmp_path_factory):
    """Property: whatever single header field is replaced (by any JSON value) or deleted, with the metadata
    hash recomputed, loading either raises a CheckpointError or gives a model that computes exactly what the
    original computes, with the same quantization settings, config and threshold table."""
    import copy

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mbq_ref.checkpoint.format import _config_dict, _meta_sha256

    header, data, meta, orig, want_logits, paths = fuzz_base
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(path=st.sampled_from(paths), value=_json_values(), delete=st.booleans())
    def check(path, value, delete):
        h, m = copy.deepcopy(header), copy.deepcopy(meta)
        kind, *rest = path
        if kind == "meta":
            _edit_at(m, rest, value, delete)
        elif kind == "index":
            _edit_at(h, rest, value, delete)
        else:
            _edit_at(h["__metadata__"], rest, value if isinstance(value, str) else json.dumps(value), delete)
        md = h.get("__metadata__")
        if kind == "meta":
            md["mbq_meta"] = json.dumps(m)
        if kind != "header" or rest[0] != "meta_sha256":
            md["meta_sha256"] = _meta_sha256(md.get("mbq_meta", ""), md.get("tokenizer", ""))
        f = folder / "fuzzed.safetensors"
        try:
            f.write_bytes(_join(h, data))
        except (TypeError, ValueError, UnicodeEncodeError):
            return  # not representable as a file (e.g. a lone surrogate key json.dumps refuses)
        try:
            got = load_checkpoint(f, with_tokenizer=False)
        except CheckpointError:
            return
        assert torch.equal(_logits(got.model, _x()), want_logits), f"{path} -> {value!r}: different model accepted"
        for key in ("quantization",):
            assert got.meta[key] == orig.meta[key], f"{path} -> {value!r}"
        # keys that say how the model was loaded (not what it computes) are outside the config hash
        assert _config_dict(got.meta["base_model"]["config"]) == _config_dict(orig.meta["base_model"]["config"]), f"{path} -> {value!r}"
        assert torch.equal(got.table.targets, orig.table.targets) and torch.equal(got.table.tau_logit, orig.table.tau_logit)

    check()


def test_sigterm_during_save_leaves_no_temporary_file(quantized, saved, tmp_path, monkeypatch):
    """A real SIGTERM half-way through writing the tensors: the previous file stays, the temporary file goes."""
    import signal

    import safetensors.torch

    from mbq_ref.atomic import Terminated, terminate_as_interrupt

    path = tmp_path / "model.safetensors"
    path.write_bytes(saved.read_bytes())
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def half_then_killed(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_killed)
    with pytest.raises(Terminated), terminate_as_interrupt():
        save_checkpoint(quantized, path, {"base_model": "changed"})
    monkeypatch.undo()
    assert path.read_bytes() == before and _leftovers(tmp_path, path) == []


# --- forged files that pass both hashes (docs/robustness.md, "reliability round 3") --------------
def _rehash_config(m):
    m["base_model"]["config_sha256"] = config_sha256(m["base_model"]["config"])


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("where", ["mbq_meta", "mbq_meta-40", "tensor-index", "metadata-entry"])
def test_deeply_nested_json_refused(saved, tmp_path, where):
    """100,000 nested brackets used to raise RecursionError; any JSON deeper than MAX_JSON_DEPTH is refused."""
    from helpers import forge

    from mbq_ref.checkpoint.format import MAX_JSON_DEPTH

    dst = tmp_path / "deep.safetensors"
    if where == "mbq_meta":
        forge(saved, dst, header=lambda md: md.update(mbq_meta=_deep(100_000)))
    elif where == "mbq_meta-40":
        forge(saved, dst, meta=lambda m: m.update(extra={"x": json.loads(_deep(MAX_JSON_DEPTH + 8))}))
    else:  # the raw header text: a deep value beside the tensor index, or inside __metadata__
        header, data = _split(saved)
        text = json.dumps(header)
        key = '"__metadata__": {' if where == "metadata-entry" else "{"
        text = text.replace(key, key + f'"zz": {_deep(100_000)}, ', 1)
        h = text.encode() + b" " * (-len(text) % 8)
        dst.write_bytes(struct.pack("<Q", len(h)) + h + data)
    with pytest.raises(CheckpointError, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        read_metadata(dst)
    with pytest.raises(CheckpointError, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        load_checkpoint(dst, with_tokenizer=False)


@pytest.mark.parametrize("flag", ["mlp_bias", "attention_bias"])
def test_config_bias_flag_refused_or_supported(saved, tmp_path, flag):
    """A config with mlp_bias/attention_bias used to end in KeyError 'q.<layer>.bias'. Refused when the layers
    store no bias; loaded (and computing exactly the original with zero biases) when they do."""
    from helpers import forge

    def set_flag(m):
        m["base_model"]["config"][flag] = True
        _rehash_config(m)

    with pytest.raises(ModelMismatchError, match=f"{flag}"):
        load_checkpoint(forge(saved, tmp_path / "flag.safetensors", meta=set_flag), with_tokenizer=False)
    parts = ("gate_proj", "up_proj", "down_proj") if flag == "mlp_bias" else ("q_proj", "k_proj", "v_proj", "o_proj")
    biased = []

    def add_bias_entries(m):
        set_flag(m)
        for info in m["quantization"]["layers"]:
            if info["name"].endswith(parts):
                info["bias"] = True
                biased.append(info)

    def add_bias_tensors(t):
        for info in biased:
            t[f"q.{info['name']}.bias"] = torch.zeros(info["shape"][0])

    dst = tmp_path / "biased.safetensors"
    forge(saved, dst, meta=add_bias_entries)  # collect the layers first (the meta edit runs after the tensors)
    forge(saved, dst, meta=add_bias_entries, tensors=add_bias_tensors)
    ck = load_checkpoint(dst, with_tokenizer=False)
    assert torch.equal(_logits(ck.model, _x()), _logits(load_checkpoint(saved, with_tokenizer=False).model, _x()))


def test_tensor_shapes_checked_against_the_architecture(saved, tmp_path):
    """A norm of the wrong shape, a config whose MLP is wider than the stored layers: refused before allocation."""
    from helpers import forge

    bad = forge(saved, tmp_path / "norm.safetensors", tensors=lambda t: t.update({"fp.model.norm.weight": torch.ones(64)}))
    with pytest.raises(ModelMismatchError, match=r"fp.model.norm.weight has shape \(64,\).*needs \(128,\)"):
        load_checkpoint(bad, with_tokenizer=False)

    def wider(m):
        m["base_model"]["config"]["intermediate_size"] *= 2
        _rehash_config(m)

    with pytest.raises(ModelMismatchError, match="mlp.gate_proj is"):
        load_checkpoint(forge(saved, tmp_path / "wide.safetensors", meta=wider), with_tokenizer=False)


def test_static_file_shapes_checked_against_the_architecture(tmp_path):
    from helpers import forge

    from mbq_ref.checkpoint import load_static_checkpoint, save_static_checkpoint
    from mbq_ref.fakequant import quantize_model

    path = save_static_checkpoint(quantize_model(random_llama("llama", layers=1), bits=3, group_size=128), tmp_path / "w3.st")

    def wider(m):
        m["base_model"]["config"]["intermediate_size"] *= 2
        _rehash_config(m)

    with pytest.raises(ModelMismatchError, match="mlp.gate_proj is"):
        load_static_checkpoint(forge(path, tmp_path / "wide.st", meta=wider))

    def no_bias(m):
        m["base_model"]["config"]["mlp_bias"] = True
        _rehash_config(m)

    with pytest.raises(ModelMismatchError, match="mlp_bias"):
        load_static_checkpoint(forge(path, tmp_path / "bias.st", meta=no_bias))


def test_missing_embedding_refused_before_allocation(saved, tmp_path):
    """Config sizes in range (vocab 2^20) with the embedding deleted used to allocate 256 GiB; now the
    architecture is checked on the meta device first."""
    from helpers import forge

    def huge(m):
        m["base_model"]["config"].update(vocab_size=2**20, hidden_size=2**12)
        _rehash_config(m)

    bad = forge(saved, tmp_path / "noemb.safetensors", meta=huge,
                tensors=lambda t: t.pop("fp.model.embed_tokens.weight"))  # fmt: skip
    with pytest.raises(ModelMismatchError, match="missing|is \\(|does not exist"):
        load_checkpoint(bad, with_tokenizer=False)
    bad = forge(saved, tmp_path / "noemb2.safetensors", tensors=lambda t: t.pop("fp.model.embed_tokens.weight"))
    with pytest.raises(ModelMismatchError, match="fp.model.embed_tokens.weight is missing"):
        load_checkpoint(bad, with_tokenizer=False)


def test_achieved_null_is_not_measured(saved, tmp_path):
    """`achieved: null` (accepted by the checker) used to raise TypeError in set_bits; it means "not measured"."""
    from helpers import forge

    bad = forge(saved, tmp_path / "null.safetensors", meta=lambda m: m["thresholds"].update(achieved=[None, None, None]))
    ck = load_checkpoint(bad, with_tokenizer=False)
    ref = load_checkpoint(saved, with_tokenizer=False)
    assert ck.set_bits(5.0) == ref.set_bits(5.0)
    assert ck.set_bits(3.0) and math.isnan(ck.table.achieved[0])


def test_tokenizer_ids_past_the_vocabulary_refused(tok_saved, tmp_path):
    from helpers import forge

    def edit(md):
        files = json.loads(md["tokenizer"])
        name = next(n for n in files if n.endswith("tokenizer.json"))
        tj = json.loads(files[name])
        tj["model"]["vocab"]["zzqq"] = 99_999
        files[name] = json.dumps(tj)
        md["tokenizer"] = json.dumps(files)

    with pytest.raises(TamperedCheckpointError, match="token ids up to 99999, past the model's vocabulary"):
        load_checkpoint(forge(tok_saved, tmp_path / "ids.safetensors", header=edit))


def _layer_key(saved, what):
    return f"q.{_layer0(saved)}.{what}"


FINITE_BUT_FATAL = {  # finite values that make every forward pass inf/NaN: refused on load
    "norm-3e38": (lambda s: ("tensors", lambda t: t["fp.model.norm.weight"].fill_(3e38)), "fp.model.norm.weight"),
    "scale-3e38": (lambda s: ("tensors", _fill(_layer_key(s, "scale"), 3e38)), "dequantize to weights"),
    "zero-1e30": (lambda s: ("tensors", lambda t: t.update({_layer_key(s, "zero"): t[_layer_key(s, "zero")].float() + 1e30})),
                  "dequantize to weights"),
    "rope_theta-0": (lambda s: ("meta", lambda m: (m["base_model"]["config"]["rope_parameters"].update(rope_theta=0),
                                                   _rehash_config(m))), "rope_theta"),
    "rms_norm_eps--1": (lambda s: ("meta", lambda m: (m["base_model"]["config"].update(rms_norm_eps=-1), _rehash_config(m))),
                        "rms_norm_eps"),
}


@pytest.mark.parametrize("case", list(FINITE_BUT_FATAL))
def test_finite_values_that_break_the_model_refused(saved, tmp_path, case):
    from helpers import forge

    make, match = FINITE_BUT_FATAL[case]
    kind, edit = make(saved)
    bad = forge(saved, tmp_path / "big.safetensors", **{kind: edit})
    with pytest.raises(TamperedCheckpointError, match=match):
        load_checkpoint(bad, with_tokenizer=False)


@pytest.mark.parametrize("edit", ["tau_logit-reversed", "achieved-reversed"])
def test_non_monotone_threshold_table_refused(saved, tmp_path, edit):
    """A reversed table routed `--bits 3` at 6.8 measured bits; now it is refused on load."""
    from helpers import forge

    if edit == "tau_logit-reversed":
        bad = forge(saved, tmp_path / "rev.safetensors",
                    tensors=lambda t: t.update({"thresholds.tau_logit": t["thresholds.tau_logit"].flip(0).contiguous()}))  # fmt: skip
        match = "not monotone"
    else:
        bad = forge(saved, tmp_path / "rev.safetensors", meta=lambda m: m["thresholds"].update(achieved=[8.0, 5.0, 2.0]))
        match = "must not decrease"
    with pytest.raises(TamperedCheckpointError, match=match):
        load_checkpoint(bad, with_tokenizer=False)


REAL_WRAPPERS = {
    "float": float, "np.float32": lambda x: np.float32(x), "np.float64": lambda x: np.float64(x),
    "np.int64": lambda x: np.int64(round(x)), "tensor0d": lambda x: torch.tensor(x), "ndarray0d": lambda x: np.array(x),
    "Fraction": lambda x: Fraction(x), "Decimal": lambda x: Decimal(repr(x)),
}  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(bits=st.floats(2.0, 8.0), wrap=st.sampled_from(sorted(REAL_WRAPPERS)))
def test_set_bits_accepts_real_numbers(saved_checkpoint, bits, wrap):
    """numpy scalars, 0-d tensors, Fraction and Decimal route exactly like the float they equal."""
    x = REAL_WRAPPERS[wrap](bits)
    assert saved_checkpoint.set_bits(x) == saved_checkpoint.set_bits(float(x))


@pytest.fixture(scope="module")
def saved_checkpoint(saved):
    return load_checkpoint(saved, with_tokenizer=False)


@pytest.mark.parametrize("value", ["3", True, 3j, [3.0], None, torch.tensor([3.0, 4.0]), np.array([3.0, 4.0])],
                         ids=["str", "bool", "complex", "list", "None", "tensor2", "array2"])  # fmt: skip
def test_set_bits_refuses_other_types_by_type(saved_checkpoint, value):
    with pytest.raises(CheckpointError, match="real number"):
        saved_checkpoint.set_bits(value)


def test_api_misuse_is_a_clear_error(quantized, saved, tmp_path):
    from mbq_ref.atomic import OutputError

    ck = load_checkpoint(saved, with_tokenizer=False)
    first = ck.pack(backend="torch")
    assert ck.pack(backend="torch") is first  # packing twice used to say "model has no MoBiLinear layers"
    ck.set_bits(5.0)
    with pytest.raises(CheckpointError, match="expect_model must be"):
        load_checkpoint(saved, expect_model=42)
    with pytest.raises(OutputError, match="empty"):
        save_checkpoint(quantized, "")


def test_size_estimate_within_10_percent(quantized, saved, tok_saved):
    """The free-space check of `mbq quantize` uses this estimate; it must be within 10 % of the real file."""
    from mbq_ref.checkpoint import estimate_checkpoint_bytes

    got = estimate_checkpoint_bytes(quantized, TINY.slice_bits, TINY.group_size, TINY.router_hidden, n_targets=3)
    assert abs(got - saved.stat().st_size) <= 0.1 * saved.stat().st_size, (got, saved.stat().st_size)
