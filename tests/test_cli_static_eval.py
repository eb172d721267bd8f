"""`mbq eval` on the static per-bit files `mbq tour` writes (OUT/per_bit/lwc_wB.safetensors)."""

import json

import pytest
import torch

from mbq_ref.cli import main


@pytest.fixture(scope="module")
def static_w3(tmp_path_factory):
    """A 3-bit RTN model of the bundled tiny Llama saved as a static checkpoint, as the tour saves its LWC models."""
    from mbq_ref.checkpoint import save_static_checkpoint
    from mbq_ref.fakequant import quantize_model
    from mbq_ref.zoo import load_model

    model = quantize_model(load_model("tiny-llama"), bits=3, group_size=128)
    path = save_static_checkpoint(model, tmp_path_factory.mktemp("static") / "rtn_w3.safetensors", {"base_model": "tiny-llama"})
    return path, model


def test_eval_reads_a_static_file_and_matches_the_model(capsys, static_w3):
    from mbq_ref.data import load_corpus, tokenize_corpus
    from mbq_ref.perplexity import perplexity
    from mbq_ref.zoo import load_tokenizer

    path, model = static_w3
    code = main(["eval", str(path), "--bits", "3", "--max-windows", "2", "--seqlen", "128", "--device", "cpu",
                 "--json", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    row = json.loads(out)
    assert row["mode"] == "static file" and row["measured_bits"] == 3 and row["backend"] == "float"
    # the perplexity of the in-memory model that was saved, on the same windows
    ids = tokenize_corpus(load_tokenizer("tiny-llama"), load_corpus("austen", "test"))
    with torch.no_grad():
        want = perplexity(model, ids, seqlen=128, max_windows=2, progress=False).ppl
    assert row["windows"] == 2 and row["ppl"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--bits", "4"], "at 3 bits only; use --bits 3"), (["--bits", "3", "--packed"], "--packed serves MoBiQuant")],
)
def test_eval_static_file_bad_options_are_one_line_errors(capsys, static_w3, extra, match):
    code = main(["eval", str(static_w3[0]), *extra, "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and match in lines[0], err


def test_eval_still_refuses_a_foreign_safetensors_file(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    code = main(["eval", str(path), "--bits", "3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "not an mbq-ref MoBiQuant checkpoint" in err
