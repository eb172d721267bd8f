"""The `mbq` command line: every command, its --help, and one-line errors with exit code 2 on bad input."""

import json
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

from mbq_ref.cli import build_parser, main

COMMANDS = ("tour", "quantize", "eval", "generate", "info", "bench")
# the smallest calibration that still exercises every step (seconds on a CPU)
QUICK = ["--nsamples", "2", "--seqlen", "64", "--epochs", "1", "--table-step", "1", "--threshold-windows", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """`mbq quantize` on the bundled model, once for this module."""
    # a legal 245-byte file name (refused before: the probe file's name went past the 255-byte limit)
    out = tmp_path_factory.mktemp("cli") / ("t" * 229 + ".mbq.safetensors")
    argv = ["quantize", "--model", "tiny-llama", "--out", str(out), "--no-progress", *QUICK,
            "--routing", "ladder", "--budget-range", "2,8", "--router-hidden", "4"]  # fmt: skip
    assert main(argv) == 0
    return out


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_line_error(capsys, *argv, match: str):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mbq {argv[0]}: error: ") and match in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


# --- help ------------------------------------------------------------------------------------
def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "bench"])
def test_every_command_has_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: mbq {cmd}" in capsys.readouterr().out


def test_bench_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mbq bench" in out and "--sim" in out


def test_console_script_is_installed():
    exe = shutil.which("mbq")
    assert exe, "`mbq` not on PATH: pip install -e ."
    r = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "--max-windows" in r.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


# --- the commands on a real checkpoint --------------------------------------------------------
def test_quantize_wrote_a_checkpoint(ckpt, capsys):
    code, out, _ = _run(capsys, "info", ckpt)
    assert code == 0
    assert "tiny-llama (LlamaForCausalLM" in out and "[2, 2, 2, 2] -> [2, 4, 6, 8]" in out and "28 MoBiLinear" in out
    # the router's budget check: trained bits next to train_bits, and the surrogate saturation
    assert "bits at the trained threshold" in out and "(train_bits 3)" in out and "surrogate saturation" in out
    code, out, _ = _run(capsys, "info", ckpt, "--json")
    meta = json.loads(out)
    assert meta["thresholds"]["targets"] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert meta["calibration"]["nsamples"] == 2 and meta["calibration"]["seqlen"] == 64
    assert meta["calibration"]["config"]["calib"]["epochs"] == 1
    res = meta["results"]
    assert res["train_bits"] == 3.0 and 2.0 <= res["avg_bits_trained"] <= 8.0 and 0 <= res["surrogate_saturation"] <= 1
    assert len(meta["thresholds"]["achieved"]) == 7  # the table stores the bits it measured
    q = meta["quantization"]
    assert q["routing"] == "ladder" and q["router_hidden"] == 4
    assert meta["calibration"]["config"]["budget_range"] == [2.0, 8.0]


@pytest.mark.slow
def test_eval_prints_ppl_and_measured_bits(ckpt, capsys):
    code, out, _ = _run(capsys, "eval", ckpt, "--bits", "3.0", "--seqlen", "128", "--max-windows", "2", "--json", "--no-progress")
    assert code == 0
    row = json.loads(out)
    assert row["windows"] == 2 and row["seqlen"] == 128 and row["mode"] == "routed"
    assert 1 < row["ppl"] < 1e5
    assert 2.0 <= row["measured_bits"] <= 8.0
    code, out, _ = _run(capsys, "eval", ckpt, "--bits", "8", "--seqlen", "128", "--max-windows", "2", "--no-progress")
    assert code == 0 and "PPL" in out and "measured average 8.000 bits" in out  # table row 8.0 = every slice


def test_eval_static_reads_whole_slices(ckpt, capsys):
    code, out, _ = _run(capsys, "eval", ckpt, "--bits", "4", "--static", "--seqlen", "128", "--max-windows", "1", "--json", "--no-progress")
    assert code == 0 and json.loads(out)["measured_bits"] == 4.0


def test_generate_schedule_switches_bits_between_tokens(ckpt, capsys):
    code, out, _ = _run(capsys, "generate", ckpt, "--prompt", "It is a truth universally", "--schedule", "2:3,8:6", "--json", "--no-progress")
    assert code == 0
    res = json.loads(out)
    steps = res["tokens"]
    assert len(steps) == 6
    assert [s["target_bits"] for s in steps] == [2.0] * 3 + [8.0] * 3
    # measured from the layers: the table rows at 2 and 8 bits are "base slice only" and "every slice"
    assert [s["measured_bits"] for s in steps] == [2.0] * 3 + [8.0] * 3
    assert steps[3]["switch_seconds"] > 0 and steps[4]["switch_seconds"] == 0
    assert res["text"] == "".join(s["text"] for s in steps)


def test_generate_prints_a_table(ckpt, capsys):
    code, out, _ = _run(capsys, "generate", ckpt, "--prompt", "Emma", "--bits", "4", "--max-new-tokens", "3", "--no-progress")
    assert code == 0
    assert "target measured" in out and out.count("\n") >= 5 and out.split("---\n")[1].startswith("Emma")


def _float_and_packed(capsys, *argv):
    """The `--json` output of ``argv`` as loaded (float MoBiLinear) and with ``--packed`` (bit-planes, on the CPU)."""
    rows = []
    for extra in ((), ("--packed",)):
        code, out, err = _run(capsys, *argv, "--json", "--no-progress", *extra)
        assert code == 0, err
        rows.append(json.loads(out))
    return rows


@pytest.mark.slow
def test_eval_packed_matches_the_float_path(ckpt, capsys):
    """--packed on the CPU: the checkpoint served from bit-planes (torch reference of the kernels);
    same routing, so the same measured bits, and the same PPL; the memory per weight is reported."""
    from mbq_ref.checkpoint import read_metadata

    g = read_metadata(ckpt)["quantization"]["group_size"]
    argv = ("eval", ckpt, "--bits", "3.0", "--seqlen", "128", "--max-windows", "2")
    ref, got = _float_and_packed(capsys, *argv)
    assert (ref["backend"], got["backend"]) == ("float", "packed") and got["device"] == "cpu"
    assert got["measured_bits"] == ref["measured_bits"] and ref["weight_bits_per_weight"] is None
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    # B_E = 8 planes + a float32 scale and an int32 zero point per group of g weights
    assert got["weight_bits_per_weight"] == pytest.approx(8 + 64 / g)
    code, out, _ = _run(capsys, *argv, "--no-progress", "--packed")
    assert code == 0 and "packed backend: 28 layers" in out and "bits per weight" in out


@pytest.mark.slow
def test_generate_packed_matches_the_float_path(ckpt, capsys):
    ref, got = _float_and_packed(capsys, "generate", ckpt, "--prompt", "Emma", "--schedule", "2:2,8:3")
    assert got["backend"] == "packed" and got["weight_bits_per_weight"] > 8
    assert got["text"] == ref["text"]
    bits = [s["measured_bits"] for s in got["tokens"]]
    assert bits == [s["measured_bits"] for s in ref["tokens"]] == [2.0, 2.0, 8.0]


@pytest.mark.parametrize("cmd", [["eval", "--bits", "3"], ["generate", "--prompt", "x"]], ids=["eval", "generate"])
def test_device_cuda_without_gpu_exits_2(capsys, ckpt, cmd):
    """--device cuda (the packed kernels) on a machine without CUDA: one line, before loading anything."""
    _one_line_error(capsys, cmd[0], ckpt, *cmd[1:], "--device", "cuda", match="--device cuda")


def test_bench_e2e_sim_prints_the_paper_beside(capsys):
    """`mbq bench --e2e --sim`: the end-to-end decode loop on the packed kernels in the simulator (tiny model)."""
    code, out, _ = _run(capsys, "bench", "--e2e", "--sim", "--prompt", "1", "--new-tokens", "1", "--settings", "2")
    assert code == 0, out
    assert "NOT performance numbers" in out
    assert "LLaMA2-7B, A100): 2 bits 404 tok/s, 3 bits 311 tok/s, 4 bits 256 tok/s" in out
    row = next(ln for ln in out.splitlines() if "packed" in ln and "tok/s" in ln)
    assert "tiny" in row and "2.00 bits" in row


def test_bench_e2e_without_gpu_exits_2(capsys):
    code, out, err = _run(capsys, "bench", "--e2e")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mbq bench: error: no CUDA GPU") and "--sim" in err


@pytest.mark.parametrize("argv", [["bench", "--sim", "--reps", "x"], ["bench", "--e2e", "--sim", "--bogus"]],
                         ids=["bench", "e2e"])  # fmt: skip
def test_bench_argument_errors_are_one_line(capsys, argv):
    """The benchmarks' own options fail like every other command: one line on stderr, no usage block, exit 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("mbq bench") and "usage:" not in err, err


# --- bad input: one line, exit 2 ---------------------------------------------------------------
def test_missing_file(capsys, tmp_path):
    _one_line_error(capsys, "eval", tmp_path / "nope.safetensors", "--bits", "3", match="no such file")


def test_corrupt_file(capsys, tmp_path, ckpt):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    _one_line_error(capsys, "eval", bad, "--bits", "3", match="truncated")
    _one_line_error(capsys, "generate", bad, "--prompt", "x", match="truncated")
    _one_line_error(capsys, "info", bad, match="truncated")


def test_foreign_file(capsys, tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_text("hello, I am not a checkpoint at all")
    _one_line_error(capsys, "eval", f, "--bits", "3", match="not a safetensors file")


@pytest.mark.parametrize("bits", ["1.5", "8.5", "0", "-3"])
def test_bits_out_of_range(capsys, ckpt, bits):
    _one_line_error(capsys, "eval", ckpt, "--bits", bits, match="out of range")


def test_bits_not_a_number(capsys, ckpt):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ckpt), "--bits", "three"])
    assert e.value.code == 2
    assert "expected a number of bits" in capsys.readouterr().err


#: requests the checkpoint cannot serve: (command, arguments after the file, what the one-line error names)
BAD_REQUESTS = {
    "static-needs-whole-slices": ("eval", ["--bits", "3", "--static"], "--static"),
    "unknown-dataset": ("eval", ["--bits", "3", "--dataset", "klingon"], "unknown dataset 'klingon'"),
    "seqlen-over-context": ("eval", ["--bits", "3", "--seqlen", "4096"], "exceeds the model's context of 512"),
    **{f"bad-schedule-{s}": ("generate", ["--prompt", "x", "--schedule", s], "schedule") for s in ("2:8,6:4", "2-8", "x:3", "2:0")},
    "schedule-bits-out-of-range": ("generate", ["--prompt", "x", "--schedule", "2:4,9:8"], "out of range"),
    "generate-past-the-context": ("generate", ["--prompt", "x", "--max-new-tokens", "600"], "context"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_one_line(capsys, ckpt, case):
    cmd, args, match = BAD_REQUESTS[case]
    _one_line_error(capsys, cmd, ckpt, *args, match=match)


def test_hub_dataset_offline_is_a_clear_error(capsys, ckpt, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(capsys, "eval", ckpt, "--bits", "3", "--dataset", "wikitext2", "--seqlen", "128", "--max-windows", "1",
                    match="cannot load 'wikitext2'")  # fmt: skip


def test_quantize_bad_inputs(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "q.safetensors"
    _one_line_error(capsys, "quantize", "--model", "no-such-org/no-such-model", "--out", out, match="cannot load model")
    _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", out, "--calib", "klingon", match="unknown dataset")
    _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", out, "--budget-range", "1,4", match="budget_range")
    _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", out, "--seqlen", "1024", match="exceeds the model's context")
    _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", tmp_path, match="is a folder")
    assert not out.exists()


def test_bench_without_gpu_exits_2(capsys):
    """The error goes to stderr as one line (stdout stays clean for results)."""
    code, out, err = _run(capsys, "bench")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mbq bench: error: no CUDA GPU") and "--sim" in err


def test_parser_has_documented_commands():
    """docs/cli.md documents every sub-command and every option of each."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert f"mbq {name}" in doc, name
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in doc, f"{opt} of `mbq {name}` is not documented in docs/cli.md"


def test_internal_failure_exits_1():
    """A bug (not bad input) gives a traceback and exit code 1, as the console script reports it."""
    code = "import sys; from mbq_ref import cli; cli._cmd_info = lambda a: 1 / 0; sys.exit(cli.main(['info', 'x']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "ZeroDivisionError" in r.stderr


# --- everything a careful user or a hostile file tried -------------------------------------------
def _edited_copy(src, dst, edit):
    """A copy of checkpoint ``src`` with its metadata edited and the metadata hash recomputed."""
    import struct

    from mbq_ref.checkpoint.format import _meta_sha256

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    md = header["__metadata__"]
    meta = json.loads(md["mbq_meta"])
    edit(meta)
    md["mbq_meta"] = json.dumps(meta)
    md["meta_sha256"] = _meta_sha256(md["mbq_meta"], md.get("tokenizer", ""))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    return dst


def test_edited_slices_with_recomputed_hash_refused(capsys, ckpt, tmp_path):
    """A reported case: slice_bits 3,3,3,3 and cumulative 3..12 with the self-hash recomputed was evaluated."""

    def edit(meta):
        meta["quantization"]["slice_bits"] = [3, 3, 3, 3]
        meta["quantization"]["cumulative_bits"] = [3, 6, 9, 12]

    bad = _edited_copy(ckpt, tmp_path / "edited.safetensors", edit)
    for cmd in (["eval", bad, "--bits", "12", "--max-windows", "1", "--seqlen", "64"], ["info", bad]):
        _one_line_error(capsys, *cmd, match="does not fit 12-bit codes")


def test_string_context_length_refused(capsys, ckpt, tmp_path):
    bad = _edited_copy(ckpt, tmp_path / "ctx.safetensors", lambda m: m["base_model"]["config"].update(max_position_embeddings="256"))
    _one_line_error(capsys, "eval", bad, "--bits", "3", match="max_position_embeddings must be an integer")


def test_symlink_loop_is_named(capsys, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    _one_line_error(capsys, "info", a, match="symbolic link loop")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["eval", "{ckpt}"], "the following arguments are required: --bits"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--nsamples", "many"], "--nsamples"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--seed", str(2**70)], "--seed"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--table-step", "1e-9"], "--table-step"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--table-step", "nan"], "--table-step"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--table-step", "7"], "--table-step"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--budget-range", "3"], "--budget-range"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--budget-range", "5,4"], "--budget-range"),
        (["quantize", "--model", "tiny-llama", "--out", "x", "--routing", "mix"], "--routing"),
        (["generate", "{ckpt}", "--prompt", "x", "--seed", str(2**70)], "--seed"),
        (["generate", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["generate", "{ckpt}", "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["generate", "{ckpt}", "--prompt", "x", "--top-k", "-1"], "--top-k"),
        (["eval", "{ckpt}", "--bits", "3", "--seqlen", "1"], "--seqlen"),
        (["frobnicate"], "invalid choice"),
    ],
    ids=["missing", "not-int", "seed-quantize", "table-step-tiny", "table-step-nan", "table-step-large",
         "budget-one", "budget-reversed", "routing-unknown", "seed-generate",
         "temperature-negative", "temperature-nan", "top-k-negative", "seqlen-1", "unknown-command"],
)  # fmt: skip
def test_argument_errors_are_one_line(capsys, ckpt, argv, match):
    """argparse errors: one line on stderr, exit 2, no usage block; each bound is checked before any work."""
    argv = [a.replace("{ckpt}", str(ckpt)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mbq") and ": error: " in lines[0] and match in lines[0], err
    assert "usage:" not in err


def test_non_utf8_prompt_is_a_clear_error(capsys, ckpt):
    """Bytes that are not UTF-8 reach sys.argv as lone surrogates (PEP 383)."""
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    _one_line_error(capsys, "generate", ckpt, "--prompt", prompt, match="not valid UTF-8")


@pytest.mark.slow
def test_one_token_prompt_gives_valid_json(capsys, ckpt, tiny_tokenizer):
    prompt = next(w for w in ("the", "a", "I", "x") if len(tiny_tokenizer(w)["input_ids"]) == 1)

    def no_nan(const):
        raise AssertionError(f"invalid JSON constant {const}")

    code, out, _ = _run(capsys, "generate", ckpt, "--prompt", prompt, "--max-new-tokens", "2", "--json", "--no-progress")
    assert code == 0
    res = json.loads(out, parse_constant=no_nan)
    assert res["prompt_tokens"] == 1 and res["prompt_bits"] is None
    code, out, _ = _run(capsys, "generate", ckpt, "--prompt", prompt, "--max-new-tokens", "2", "--no-progress")
    assert code == 0 and "nan" not in out.lower().split("---")[0] and "no prefill pass" in out


def _no_calibration(monkeypatch):
    import mbq_ref.thresholds

    def fail(*a, **k):
        raise AssertionError("calibration started although the output cannot be written")

    monkeypatch.setattr(mbq_ref.thresholds, "quantize_and_table", fail)


def test_quantize_checks_the_output_before_calibrating(capsys, tmp_path, monkeypatch):
    """A file in the way, a read-only filesystem (also for a new folder there), a full disk: exit 2 before calibrating."""
    from helpers import small_mount

    _no_calibration(monkeypatch)
    (tmp_path / "afile").write_text("x")
    base = ["--model", "tiny-llama", "--no-progress", *QUICK]
    _one_line_error(capsys, "quantize", "--out", tmp_path / "afile" / "m.safetensors", *base, match="is a file")
    with small_mount(ro=True) as mnt:
        for out in (mnt / "m.safetensors", mnt / "new" / "m.safetensors"):
            _one_line_error(capsys, "quantize", "--out", out, *base, match="read-only")
    with small_mount(size=64 * 1024) as mnt:
        _one_line_error(capsys, "quantize", "--out", mnt / "m.safetensors", *base, match="MiB free")
        assert list(mnt.iterdir()) == []


def test_sigterm_exits_143_like_an_interrupt(capsys, monkeypatch):
    import os
    import signal

    from mbq_ref import cli

    monkeypatch.setattr(cli, "_cmd_info", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    code, _, err = _run(capsys, "info", "x")
    assert code == 143 and err.strip() == "terminated"


def test_table_step_bound_agrees_with_the_table():
    from mbq_ref import cli, thresholds

    assert cli.MIN_TABLE_STEP == thresholds.MIN_TABLE_STEP


# --- reliability round 3 (docs/robustness.md) ------------------------------------------------------
def test_fixture_name_of_245_bytes_was_written(ckpt):
    assert len(ckpt.name) == 245 and ckpt.is_file()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_dtype_half_refused_before_work(capsys, tmp_path, monkeypatch, dtype):
    """--dtype float16/bfloat16 used to crash after the whole calibration; now one line before loading anything."""
    import mbq_ref.zoo

    _no_calibration(monkeypatch)
    monkeypatch.setattr(mbq_ref.zoo, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", tmp_path / "m.st", "--dtype", dtype,
                    match=f"--dtype {dtype} is not supported")  # fmt: skip
    assert not list(tmp_path.iterdir())


def _forged(ckpt, tmp_path, **edits):
    from helpers import forge

    return forge(ckpt, tmp_path / "forged.mbq.safetensors", **edits)


EVAL = ["--bits", "3", "--max-windows", "1", "--seqlen", "64", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("cmd", ["info", "eval", "generate"])
def test_forged_files_are_one_line_errors(capsys, ckpt, tmp_path, cmd):
    """Deep JSON, a finite norm weight of 3e38, a reversed threshold table: exit 2 in every command that reads them."""
    args = {"info": [], "eval": EVAL, "generate": ["--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"]}[cmd]
    cases = {
        "deeper than": dict(header=lambda md: md.update(mbq_meta="[" * 100_000 + "]" * 100_000)),
        "fp.model.norm.weight": dict(tensors=lambda t: t["fp.model.norm.weight"].fill_(3e38)),
        "not monotone": dict(tensors=lambda t: t.update({"thresholds.tau_logit": t["thresholds.tau_logit"].flip(0).contiguous()})),
    }
    for match, edit in cases.items():
        if cmd == "info" and match != "deeper than":
            continue  # info reads the header only
        _one_line_error(capsys, cmd, _forged(ckpt, tmp_path, **edit), *args, match=match)


def test_null_achieved_evaluates(capsys, ckpt, tmp_path):
    bad = _forged(ckpt, tmp_path, meta=lambda m: m["thresholds"].update(achieved=[None] * len(m["thresholds"]["targets"])))
    code, out, err = _run(capsys, "eval", bad, *EVAL, "--json")
    assert code == 0, err
    assert json.loads(out)["measured_bits"] > 0


def test_info_json_is_strict_and_text_is_escaped(capsys, ckpt, tmp_path):
    """NaN became `NaN` (not JSON); an escape sequence in base_model.id reached the terminal."""
    def edit(m):
        m["base_model"]["id"] = "evil\x1b[2J\nsecond line\u202e"
        m["thresholds"]["achieved"][0] = float("nan")
        m["results"]["ppl"] = float("inf")

    bad = _forged(ckpt, tmp_path, meta=edit)
    code, out, _ = _run(capsys, "info", bad, "--json")
    meta = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert code == 0 and meta["thresholds"]["achieved"][0] is None and meta["results"]["ppl"] is None
    code, out, _ = _run(capsys, "info", bad)
    assert code == 0 and "\x1b" not in out and "\u202e" not in out and "\\x1b[2J\\nsecond line\\u202e" in out
    assert not any(line.startswith("second line") for line in out.splitlines())


def _mbq(*argv, **kw):
    import os

    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", "mbq_ref.cli", *map(str, argv)], stderr=subprocess.PIPE, text=True,
                          env=env, check=False, **kw)  # fmt: skip


def test_full_and_closed_stdout(ckpt):
    """`mbq info X > /dev/full`: one line, exit 2; `mbq info X --json | true`: quiet, exit 141 (like any filter)."""
    with open("/dev/full", "w") as full:
        r = _mbq("info", ckpt, stdout=full)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot write the output" in r.stderr
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.close()"], stdin=subprocess.PIPE)
    p.wait()
    r = _mbq("info", ckpt, "--json", stdout=p.stdin)
    p.stdin.close()
    assert r.returncode == 141 and "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr


def test_tiny_temperatures_sample_like_greedy(ckpt):
    """--temperature 1e-45 used to fail in torch.multinomial (inf/NaN probabilities)."""
    from mbq_ref.checkpoint import load_checkpoint
    from mbq_ref.generate import generate

    ck = load_checkpoint(ckpt)
    greedy = generate(ck.model, ck.tokenizer, "It is a truth", ck.set_bits, bits=4, max_new_tokens=3)
    for t in (1e-45, 5e-324, 1e-300):
        res = generate(ck.model, ck.tokenizer, "It is a truth", ck.set_bits, bits=4, max_new_tokens=3, temperature=t)
        assert [s.token_id for s in res.steps] == [s.token_id for s in greedy.steps], t


def test_nan_logits_in_generate_are_an_error(ckpt):
    """A model that overflows used to print `<pad><pad>...` (argmax of NaN) with exit 0."""
    import torch

    from mbq_ref.checkpoint import load_checkpoint
    from mbq_ref.generate import GenerateError, generate

    ck = load_checkpoint(ckpt)
    with torch.no_grad():
        ck.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(GenerateError, match="NaN/inf logits"):
        generate(ck.model, ck.tokenizer, "It is a truth", ck.set_bits, bits=4, max_new_tokens=2)


@pytest.mark.parametrize("kind", ["devnull", "fifo", "loop", "dangling-folder", "long-name"])
def test_quantize_outputs_refused_before_work(capsys, tmp_path, monkeypatch, kind):
    """Devices and FIFOs were replaced by a regular file; link loops and links to nothing were found after
    calibration; a 300-character name raised OSError."""
    import os

    _no_calibration(monkeypatch)
    os.mkfifo(tmp_path / "fifo")
    os.symlink("loopB", tmp_path / "loopA")
    os.symlink("loopA", tmp_path / "loopB")
    os.symlink("nowhere", tmp_path / "dangling")
    out, match = {
        "devnull": ("/dev/null", "character device"),
        "fifo": (tmp_path / "fifo", "FIFO"),
        "loop": (tmp_path / "loopA" / "x.st", "symbolic link loop"),
        "dangling-folder": (tmp_path / "dangling" / "x.st", "symbolic link to a missing folder"),
        "long-name": (tmp_path / ("n" * 300), "too long"),
    }[kind]
    _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", out, "--no-progress", *QUICK, match=match)
    assert not Path("/dev/null").is_file() and (tmp_path / "fifo").exists() and not (tmp_path / "fifo").is_file()


def test_tour_output_and_space_checked_before_work(capsys, tmp_path, monkeypatch):
    """`mbq tour --quick --out` on a 1 MiB disk ran 78 s before failing; a 300-character name raised OSError."""
    from helpers import small_mount

    import mbq_ref.tour

    monkeypatch.setattr(mbq_ref.tour, "run_tour", lambda *a, **k: pytest.fail("the tour started"))
    _one_line_error(capsys, "tour", "--quick", "--out", tmp_path / ("n" * 300), "--no-progress", match="too long")
    with small_mount(size=2**20) as mnt:
        _one_line_error(capsys, "tour", "--quick", "--out", mnt / "run", "--no-progress", match="MiB free")
        assert list(mnt.iterdir()) == []


def test_quantize_space_estimate_refuses_an_8_mib_disk(capsys, monkeypatch):
    """The estimate was 5.0 MiB for a 14.2 MiB file, so an 8 MiB disk failed after calibration."""
    from helpers import small_mount

    _no_calibration(monkeypatch)
    with small_mount(size=8 * 2**20) as mnt:
        line = _one_line_error(capsys, "quantize", "--model", "tiny-llama", "--out", mnt / "m.st", "--no-progress",
                               *QUICK, match="MiB free")  # fmt: skip
        assert list(mnt.iterdir()) == []
    need = float(line.split("needs about ")[1].split(" MiB")[0])
    assert need > 8  # the real file (QUICK: a 4-row table) is about 14 MiB; tests/test_checkpoint.py checks within 10 %


def test_quantize_local_folder_problem_is_named(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = _one_line_error(capsys, "quantize", "--model", tmp_path / "empty", "--out", tmp_path / "m.st", match="has no config.json")
    assert "offline" not in line


def test_data_dir_that_is_a_file(capsys, ckpt, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("MBQ_DATA_DIR", str(tmp_path / "f"))
    _one_line_error(capsys, "eval", ckpt, *EVAL, match="is a file, not a folder")


BENCH_ERRORS = {
    "e2e-new-tokens": (["--e2e", "--sim", "--new-tokens", "-1"], "--new-tokens"),
    "e2e-models": (["--e2e", "--sim", "--models", "x"], "unknown model 'x'"),
    "e2e-settings": (["--e2e", "--sim", "--settings", "bogus"], "bogus"),
    "shapes": (["--sim", "--shapes", "abc"], "bad shape"),
    "group-size": (["--sim", "--group-size", "7", "--shapes", "96x32"], "group_size"),
    "slice-bits": (["--sim", "--slice-bits", "9,9"], "--slice-bits"),
}


@pytest.mark.parametrize("case", list(BENCH_ERRORS))
def test_bench_errors_are_one_line_on_stderr(capsys, case):
    argv, match = BENCH_ERRORS[case]
    prog = "mbq bench --e2e" if "--e2e" in argv else "mbq bench"
    code, out, err = _run(capsys, "bench", *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and match in lines[0], (out, err)
    assert "error" not in out
