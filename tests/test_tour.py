"""`mbq tour` end to end with tiny settings: every section, every file, every report key documented."""

import json
import re
from pathlib import Path

import pytest
import torch

from mbq_ref.checkpoint import load_checkpoint
from mbq_ref.thresholds import threshold_table
from mbq_ref.tour import TourSettings, run_tour

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

# every step of the real tour, with the smallest counts that still exercise it
MICRO = {
    "fp_max_windows": 1, "eval_windows": 1, "eval_seqlen": 128, "rtn_bits": (2, 8), "lwc_bits": (2, 3),
    "sweep": (2.0, 3.0, 8.0), "table_step": 2.0, "threshold_windows": 2, "general_bits": (3.0,),
    "controls_bits": (3.0,), "refit_windows": 1, "outliers": True,
    "calib": {"nsamples": 2, "seqlen": 64, "epochs": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    report = run_tour(out, progress=False, settings=TourSettings(**MICRO))
    return out, report


def _paths(obj, prefix=""):
    """Dotted paths of the leaves of nested dicts (lists and empty dicts are leaves)."""
    for k, v in obj.items():
        p = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from _paths(v, p)
        else:
            yield p


def _documented_patterns():
    text = DOC.read_text().split("### `report.json`")[1].split("\n## ")[0]
    pats = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        for key in re.findall(r"`([^`]+)`", line.split("|")[1]):
            rx = re.escape(key)
            rx = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m.group(1).replace(",", "|").replace("\\", "") + ")", rx)
            rx = re.sub(r"<[^>]+>", "[^.]+", rx.replace("\\<", "<").replace("\\>", ">"))
            pats.append((key, re.compile(rx + r"(\..*)?$")))
    return pats


def test_files_written(tour):
    out, report = tour
    for name in ("report.json", "report.md", "mobiquant.safetensors", *report["plots"]):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    for heading in ("Full-precision perplexity", "Headline", "Static per-bit PTQ", "MoBiQuant", "One checkpoint", "Generalization"):
        assert heading in md
    assert sorted(report["plots"]) == ["controls.png", "layer_bits.png", "mismatch.png", "outliers.png", "ppl_vs_bits.png"]
    assert "Routing against controls" in md


def test_every_report_key_is_documented(tour):
    _, report = tour
    pats = _documented_patterns()
    assert len(pats) > 40
    undocumented = [p for p in _paths(report) if not any(rx.match(p) for _, rx in pats)]
    assert not undocumented, f"report.json keys missing from docs/cli.md: {undocumented[:10]}"
    paths = list(_paths(report))
    stale = [key for key, rx in pats if not any(rx.match(p) for p in paths)]
    assert not stale, f"docs/cli.md documents keys the tour does not write: {stale}"


def test_fp_section_keeps_its_keys(tour):
    _, report = tour
    assert set(report["fp"]) == {"austen", "bible", "shakespeare"}
    for row in report["fp"].values():
        assert set(row) == {"ppl", "windows", "tokens"} and row["ppl"] > 1 and row["windows"] == 1


def test_numbers_are_consistent(tour):
    _, report = tour
    mq = report["mobiquant"]
    assert [r["target"] for r in mq["sweep"]] == [2.0, 3.0, 8.0]
    # the table's 2- and 8-bit rows are "base slice only" and "every slice": exact on any text
    assert mq["sweep"][0]["test_bits"] == 2.0 and mq["sweep"][-1]["test_bits"] == 8.0
    assert mq["fixed"]["8"]["ppl"] == mq["sweep"][-1]["ppl"]
    assert set(mq["fixed"]) == {"2", "4", "6", "8"}
    assert 2.0 <= mq["avg_bits_trained_test"] <= 8.0 and 0.0 <= mq["surrogate_saturation"] <= 1.0
    assert set(report["static"]["lwc"]["2"]["eval_at_bits"]) == {"2", "3"}
    assert report["checkpoint"]["roundtrip_identical"] is True
    assert report["checkpoint"]["switch"]["weight_bytes_loaded"] == 0
    assert set(report["generalization"]) == {"austen", "bible", "shakespeare"}
    assert "refit_ppl" in report["generalization"]["bible"][0] and "refit_ppl" not in report["generalization"]["austen"][0]
    (row,) = report["controls"]["rows"]
    # random keeps the router's per-layer histogram on its inputs: the same bits up to upstream changes
    assert row["router"]["delta_nll"] == 0.0 and abs(row["random"]["bits"] - row["router"]["bits"]) < 0.5
    assert row["static"]["bits"] <= 3.0 + 1e-9 and row["lwc"]["bits"] == 3.0
    assert report["headline"]["rows"][1]["rtn"] is None  # RTN was not run at 3 bits in this micro tour
    assert report["headline"]["rows"][1]["lwc"] == report["static"]["lwc"]["3"]["ppl"]


def test_checkpoint_from_the_tour_loads_and_routes(tour):
    out, _ = tour
    ck = load_checkpoint(out / "mobiquant.safetensors", expect_model="tiny-llama")
    assert ck.meta["base_model"]["id"] == "tiny-llama"
    assert ck.meta["thresholds"]["targets"] == [2.0, 4.0, 6.0, 8.0]
    assert ck.meta["calibration"]["nsamples"] == 2


def test_threshold_table_is_monotone_and_exact_at_the_ends():
    """The table on a barely calibrated random model: ends exact, thresholds and bits monotone."""
    from helpers import random_llama

    from mbq_ref.calibrate import CalibConfig
    from mbq_ref.mobiquant import MoBiConfig, quantize_mobiquant

    model = random_llama("llama", layers=1)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize_mobiquant(model, ids, MoBiConfig(calib=CalibConfig(nsamples=2, seqlen=32, epochs=1, batch_size=2)), progress=False)
    table = threshold_table(model, ids, [2.0, 3.0, 5.0, 8.0])
    assert table[2.0]["achieved"] == 2.0 and table[8.0]["achieved"] == 8.0
    logits = [next(iter(v["logits"].values())) for v in table.values()]
    assert logits == sorted(logits, reverse=True)  # more bits = lower threshold
    achieved = [v["achieved"] for v in table.values()]
    assert achieved == sorted(achieved)
    # an untrained router scores all 64 tokens alike, so the curve jumps in big steps;
    # each target still gets the closest measured point
    assert all(2.0 <= a <= 8.0 for a in achieved)


def test_report_writes_are_atomic_on_a_full_disk(tmp_path):
    """report.json, report.md and the plots go through atomic writes: on a real full filesystem each is a
    one-line OutputError, the previous file stays and no temporary file (e.g. report.json.tmp) is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from helpers import small_mount

    from mbq_ref import tour as t
    from mbq_ref.atomic import OutputError

    report = {
        "meta": {"timestamp": "now", "machine": "test", "wall_seconds": 0},
        "setup": {},
        "fp": {"austen": {"ppl": 1.0, "windows": 1}},
        "padding": "x" * (256 * 1024),  # bigger than the filesystem
    }
    with small_mount(size=64 * 1024) as mnt:
        for name in ("report.json", "report.md", "plot.png"):
            (mnt / name).write_text("previous\n")
        with pytest.raises(OutputError, match="disk is full"):
            t._save_json(report, mnt)
        fig, ax = plt.subplots(figsize=(40, 40))
        ax.imshow(torch.rand(800, 800).numpy())  # a PNG far over 64 KiB
        with pytest.raises(OutputError, match="disk is full"):
            t._save_png(fig, mnt / "plot.png")
        plt.close(fig)
        t._write_markdown({**report, "fp": {f"d{i}": {"ppl": 1.0, "windows": 1} for i in range(1)}}, mnt / "report.md")
        assert (mnt / "report.md").read_text().startswith("# mbq tour report")  # small: fits, replaced atomically
        assert sorted(p.name for p in mnt.iterdir()) == ["plot.png", "report.json", "report.md"]
        assert (mnt / "report.json").read_text() == "previous\n" and (mnt / "plot.png").read_text() == "previous\n"


def test_tour_output_checked_first(tmp_path):
    from mbq_ref.atomic import OutputError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        run_tour(tmp_path / "afile", progress=False, settings=TourSettings(**MICRO))


def test_model_presets():
    """The tiny default is unchanged; SmolLM2 gets group 64 (576 = 4.5 x 128) and the per-token sections."""
    from mbq_ref.cli import build_parser

    tiny = TourSettings()
    assert (tiny.model, tiny.group_size, tiny.outliers, tiny.eval_windows, tiny.fp_max_windows) == ("tiny-llama", 128, False, 16, None)
    smol = TourSettings(model="smollm2-135m")
    assert smol.group_size == 64 and smol.outliers and 576 % smol.group_size == 0 and 1536 % smol.group_size == 0
    assert smol.fp_max_windows == 8 and (min(smol.controls_bits), max(smol.controls_bits)) == (2.5, 4.0)  # the 2.5-4-bit budgets
    quick = TourSettings(True, model="smollm2-135m")
    assert quick.group_size == 64 and quick.eval_windows == 4  # quick counts, the model's group size
    assert TourSettings(model="smollm2-135m", group_size=32).group_size == 32  # explicit overrides win
    with pytest.raises(ValueError, match="unknown tour model"):
        TourSettings(model="llama-7b")
    with pytest.raises(TypeError, match="unknown tour setting"):
        TourSettings(group=64)
    args = build_parser().parse_args(["tour", "--model", "smollm2-135m", "--out", "x"])
    assert args.model == "smollm2-135m" and build_parser().parse_args(["tour"]).model == "tiny-llama"


def test_outlier_section(tour):
    """Per-token overlap matrices are symmetric with a unit diagonal; router rows cover every projection."""
    _, report = tour
    o = report["outliers"]
    jac, rho = o["sensitivity"]["jaccard"], o["sensitivity"]["spearman"]
    n = len(o["sensitivity"]["bits"])
    assert all(jac[i][i] == 1.0 and rho[i][i] == 1.0 for i in range(n))
    assert all(jac[i][j] == jac[j][i] for i in range(n) for j in range(n))
    assert len(o["router"]["layers"]) == len(report["mobiquant"]["layer_bits_at_3"])
    assert {m["layer"] for m in o["massive"]} == set(range(len(o["massive"])))
    assert 2.0 <= o["router"]["avg_bits"] <= 8.0 and len(o["router"]["top_tokens"]) == 10
    md = (tour[0] / "report.md").read_text()
    assert "Outlier tokens across bit-widths" in md and "Where the router sends bits" in md


def test_readme_smollm2_rows_are_the_committed_ones():
    """Every table row the README quotes under its SmolLM2 heading is a row of the committed tour report."""
    root = DOC.parent.parent
    part = (root / "README.md").read_text().split("### A real pretrained Llama: SmolLM2-135M", 1)[1].split("\n#", 1)[0]
    quoted = part.split("From [`docs/results_smollm2/report.md`]", 1)
    rows = [r for r in (quoted[1] if len(quoted) > 1 else "").splitlines() if r.startswith("| ") and "---" not in r]
    if not rows:
        assert "results_smollm2" not in part or "not yet" in part, "README points at SmolLM2 results but quotes no rows"
        return
    report = (root / "docs" / "results_smollm2" / "report.md").read_text()
    for row in rows:
        assert row in report, f"README row not in docs/results_smollm2/report.md: {row[:60]}"
