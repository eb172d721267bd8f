"""One-file MoBiQuant checkpoints: exact round trip, atomic save, and every refusal (mbq_ref.checkpoint)."""

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
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


def test_embedded_tokenizer_roundtrip(quantized, tmp_path, tiny_tokenizer):
    path = save_checkpoint(quantized, tmp_path / "tok.safetensors", {"base_model": "random"}, tokenizer=tiny_tokenizer)
    ck = load_checkpoint(path)
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

        def half_then_fail(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:  # the disk filled up halfway through
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(28, "No space left on device")

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
    from mbq_ref.checkpoint import _meta_sha256

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


# --- static per-bit checkpoints (the baseline) ----------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_roundtrip(bits):
    from mbq_ref.checkpoint import pack_bits, unpack_bits

    codes = torch.randint(0, 2**bits, (37, 50), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).reshape(codes.shape), codes.to(torch.uint8))


def test_pack_bits_known_answer():
    from mbq_ref.checkpoint import pack_bits

    assert pack_bits(torch.tensor([5, 1, 7]), 3).tolist() == [0b10100111, 0b10000000]


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


def test_static_file_is_smaller_per_width(saved, tmp_path, quantized):
    """Bit-packed codes: a 2-bit static file stores a quarter of the code bytes of the 8-bit MoBiQuant file."""
    from safetensors import safe_open

    from mbq_ref.checkpoint import save_static_checkpoint
    from mbq_ref.fakequant import quantize_model

    path = save_static_checkpoint(quantize_model(random_llama("llama", layers=1), bits=2), tmp_path / "w2.safetensors")
    with safe_open(str(path), "pt") as f:
        static_codes = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith(".codes"))
    with safe_open(str(saved), "pt") as f:
        mobi_codes = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith(".codes"))
    assert static_codes * 4 == mobi_codes


def test_threshold_table_refuses_what_it_cannot_reach():
    """A row that measured 2.75 bits for a 2.5 target: asking for 2.5 is an error, not 2.75 bits in silence."""
    from mbq_ref.checkpoint import ThresholdTable

    table = ThresholdTable(
        torch.tensor([2.5, 3.0, 7.5], dtype=torch.float64),
        torch.tensor([[3.0, 3.0], [2.0, 2.0], [-3.0, -3.0]], dtype=torch.float64),
        ["a", "b"],
        [2.75, 3.0, 7.41],
    )
    with pytest.raises(CheckpointError, match="reaches 2.750..7.410 measured bits, not 2.5"):
        table.logits_for(2.5)
    with pytest.raises(CheckpointError, match="not 7.6"):
        table.logits_for(7.6)
    assert table.logits_for(2.8) == pytest.approx({"a": 3.0 - 0.2, "b": 3.0 - 0.2})  # blend by measured bits
    assert table.logits_for(7.5) == {"a": -3.0, "b": -3.0}  # 0.09 from its measurement: within reach
