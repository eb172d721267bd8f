"""Notebook hygiene: every jupytext pair in sync, chapters listed in the README, no network or absolute paths."""

import re
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.py") if re.match(r"\d\d[a-z]?_", p.name))  # 00_x.py, 03a_x.py


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_chapters():
    assert SOURCES, "no notebooks/NN_topic.py chapters found"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync(src):
    twin = src.with_suffix(".ipynb")
    assert twin.is_file(), f"{twin.name} missing: run `jupytext --sync {src.relative_to(ROOT)}`"
    py, ipynb = jupytext.read(src), jupytext.read(twin)
    assert _cells(py) == _cells(ipynb), f"{src.name} and {twin.name} differ: run `jupytext --sync {src.relative_to(ROOT)}`"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_no_absolute_paths_or_network(src):
    code = "\n".join(c.source for c in jupytext.read(src).cells if c.cell_type == "code")
    assert not re.search(r"['\"]/(work|home|root|tmp|Users)/", code), "absolute path in a chapter"
    for call in ("http://", "https://", "urllib", "requests.", "hf_hub_download", "snapshot_download"):
        assert call not in code, f"{src.name} reaches the network ({call})"


def test_readme_chapter_table_matches_notebooks():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"notebooks/(\d\d[a-z]?_[a-z0-9_]+)\.py", readme))
    assert listed == {p.stem for p in SOURCES}, "README chapter table and notebooks/ disagree"


def test_readme_results_are_the_generated_ones():
    """Every table row the README quotes from docs/results_chN.md is in that generated file."""
    readme = (ROOT / "README.md").read_text()
    for n in (1, 2, 3):
        generated = (ROOT / "docs" / f"results_ch{n}.md").read_text()
        part = readme.split(f"### Chapter {n} ", 1)[1].split("\n#", 1)[0]
        rows = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]
        assert rows, f"README quotes no table for chapter {n}"
        for row in rows:
            assert row in generated, f"README row not in docs/results_ch{n}.md: {row[:60]}"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_chapter_calls_setup_chapter(src):
    """Every chapter starts with mbq_ref.chapter.setup_chapter(): one thread, a seed, quiet output."""
    code = "\n".join(c.source for c in jupytext.read(src).cells if c.cell_type == "code")
    assert "setup_chapter(" in code, f"{src.name} does not call mbq_ref.chapter.setup_chapter()"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_committed_outputs_have_no_stderr(src):
    """A reader sees no warnings or progress bars in a chapter's committed outputs (re-execute it if this fails)."""
    nb = jupytext.read(src.with_suffix(".ipynb"))
    noisy = [
        (i, "".join(o.get("text", ""))[:80])
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == "stderr"
    ]
    assert not noisy, f"{src.with_suffix('.ipynb').name}: stderr in cell(s) {noisy[:3]}"
