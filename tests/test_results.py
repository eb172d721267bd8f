"""docs/results_chN.md: written only by scripts/write_results.py, checked (not written) by the chapters."""

import subprocess
import sys
from pathlib import Path

import pytest

from mbq_ref import results
from mbq_ref.results import CHAPTERS, ResultsMismatch, compare, generated_by, record

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_results_file_names_its_command_and_parses(n):
    text = (ROOT / "docs" / f"results_ch{n}.md").read_text()
    assert generated_by(n) in text, f"docs/results_ch{n}.md was not written by `python scripts/write_results.py {n}`"
    assert "| " in text and compare(text, text) == []
    assert (ROOT / CHAPTERS[n]).is_file()


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_chapter_checks_instead_of_writing(n):
    code = (ROOT / CHAPTERS[n]).read_text()
    assert f"record({n}," in code and "results_ch" not in code.replace(f"docs/results_ch{n}.md", "")
    assert ".write_text(" not in code


TEXT = "| LWC 2-bit | **118.50** | 77.94 |\nFull precision: 70.90. 1.16% clipped, torch 2.13.0+cpu.\n"


def test_compare_tolerates_noise_but_not_changes():
    assert compare(TEXT, TEXT) == []
    assert compare(TEXT.replace("118.50", "119.10"), TEXT) == []  # 0.5 %: run-to-run noise
    assert compare(TEXT.replace("torch 2.13.0+cpu", "torch 2.11.0+cu130"), TEXT) == []  # provenance only
    assert compare(TEXT.replace("118.50", "124.80"), TEXT)  # 5 %: a different result
    assert compare(TEXT.replace("1.16%", "1.30%"), TEXT)  # small numbers: 0.01 absolute
    assert compare(TEXT.replace("LWC", "RTN"), TEXT)  # words must match
    assert compare(TEXT + "extra line\n", TEXT)


def test_record_checks_by_default_and_writes_only_when_asked(tmp_path, monkeypatch):
    target = tmp_path / "results_ch2.md"
    monkeypatch.setattr(results, "results_path", lambda n: target)
    monkeypatch.delenv(results.WRITE_ENV, raising=False)
    with pytest.raises(ResultsMismatch, match="missing.*write_results.py 2"):
        record(2, TEXT)
    assert not target.exists()
    monkeypatch.setenv(results.WRITE_ENV, "1")
    record(2, TEXT)
    assert target.read_text() == TEXT
    monkeypatch.delenv(results.WRITE_ENV)
    record(2, TEXT.replace("77.94", "77.95"))  # within tolerance: passes, file untouched
    assert target.read_text() == TEXT
    with pytest.raises(ResultsMismatch, match=r"chapter 2 no longer matches .*write_results.py 2") as exc:
        record(2, TEXT.replace("77.94", "90.00"))
    assert "\n" not in str(exc.value) and target.read_text() == TEXT


def test_write_script_refuses_unknown_chapter():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "write_results.py"), "9"], capture_output=True, text=True)
    assert out.returncode == 2 and "no results file for chapter(s) [9]" in out.stderr


def test_tests_pin_the_float_code_path():
    """The suite runs with MKL/ATen pinned to AVX2 (conftest.py): the strict check is the one that runs."""
    assert results.pinned_numerics()


def test_unpinned_runs_report_instead_of_failing(tmp_path, monkeypatch, capsys):
    target = tmp_path / "results_ch2.md"
    target.write_text(TEXT)
    monkeypatch.setattr(results, "results_path", lambda n: target)
    monkeypatch.delenv(results.WRITE_ENV, raising=False)
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    record(2, TEXT.replace("77.94", "90.00"))  # another CPU code path: printed, not raised
    assert "does not pin the float code path" in capsys.readouterr().out
    monkeypatch.setenv(results.WRITE_ENV, "1")
    with pytest.raises(ResultsMismatch, match="MKL_CBWR=AVX2"):  # and never written that way
        record(2, TEXT)
    assert target.read_text() == TEXT


def test_read_table_parses_what_markdown_table_writes(tmp_path):
    from mbq_ref.errors import MBQError
    from mbq_ref.results import markdown_table, read_table

    text = markdown_table(["lever", "bits", "gap ± SE"], [["baseline", "3.000", "+0.0346 ± 0.0131"], ["2x", "5", "(reference)"]])
    path = tmp_path / "t.md"
    path.write_text(f"# title\n\nprose | with a bar\n\n{text}\n\nafter\n| other | table |\n")
    rows = read_table(path, first="lever")
    assert rows == [
        {"lever": "baseline", "bits": 3.0, "gap ± SE": (0.0346, 0.0131)},
        {"lever": "2x", "bits": 5.0, "gap ± SE": "(reference)"},
    ]
    with pytest.raises(MBQError, match="no markdown table starting with column 'nope'"):
        read_table(path, first="nope")
