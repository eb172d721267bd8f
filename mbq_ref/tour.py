"""``mbq tour``: the main job on the bundled data, end to end on a CPU.

Writes ``OUT/report.json`` (every number; keys documented in the README) and
``OUT/report.md`` (the same as tables), plus plots in ``OUT/``.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .data import BUNDLED, load_corpus, tokenize_corpus
from .perplexity import perplexity
from .zoo import load_model

__all__ = ["run_tour", "TOUR_SEQLEN"]

#: Full-protocol FP perplexity uses the model's whole context.
TOUR_SEQLEN = 512


def _fp_section(model, tok, quick: bool, progress: bool) -> dict:
    out = {}
    for name in BUNDLED:
        ids = tokenize_corpus(tok, load_corpus(name, "test"))
        res = perplexity(model, ids, seqlen=TOUR_SEQLEN, max_windows=8 if quick else None, progress=progress, desc=f"FP {name}")
        out[name] = {"ppl": round(res.ppl, 4), "windows": res.n_windows, "tokens": int(ids.numel())}
    return out


def _write_markdown(report: dict, path: Path) -> None:
    lines = ["# mbq tour report", "", f"Generated {report['meta']['timestamp']} on {report['meta']['machine']}.", ""]
    lines += ["## Full-precision perplexity (bundled tiny-llama)", "", "| domain | PPL | windows x seqlen |", "|---|---|---|"]
    for name, r in report["fp"].items():
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['windows']} x {TOUR_SEQLEN} |")
    path.write_text("\n".join(lines) + "\n")


def run_tour(out: Path, quick: bool = False, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    model, tok = load_model("tiny-llama", with_tokenizer=True)
    report: dict = {
        "meta": {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "quick": quick,
        }
    }
    report["fp"] = _fp_section(model, tok, quick, progress)
    report["meta"]["wall_seconds"] = round(time.time() - t0, 1)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / "report.json")
    _write_markdown(report, out / "report.md")
    return report
