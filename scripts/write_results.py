"""Rewrite docs/results_chN.md by running the chapters that compute them.

    python scripts/write_results.py          # chapters 1, 2 and 3 (about 20-30 min on 2 CPU cores)
    python scripts/write_results.py 2        # one chapter

Each chapter (``notebooks/NN_*.py``, run as a plain script so the numbers are
exactly the chapter's own) ends with ``mbq_ref.results.record``; with
``MBQ_WRITE_RESULTS=1`` set, as here, that writes the file instead of checking it.
Nothing else writes these files: running the notebooks or the tests only checks them.
Chapter 3 (``notebooks/03b_mobiroute_calibration.py``) takes its calibrated models from ``runs/cache/`` when the same code, model,
windows and settings made them (``mbq_ref.cache``; chapter 4 reads the same entries), so
its numbers are those of a fresh calibration; ``MBQ_CACHE=0`` forces one anyway.
The notebooks' committed outputs are refreshed separately (re-execute the .ipynb).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mbq_ref.results import CHAPTERS, NUMERICS, WRITE_ENV  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # no `choices=`: with nargs="*" argparse would check the empty default against them and refuse it
    ap.add_argument("chapters", nargs="*", type=int, help=f"chapters among {sorted(CHAPTERS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.chapters) - set(CHAPTERS))
    if unknown:
        ap.error(f"no results file for chapter(s) {unknown}; choose among {sorted(CHAPTERS)}")
    chapters = args.chapters or sorted(CHAPTERS)
    env = dict(os.environ, **{WRITE_ENV: "1", "MPLBACKEND": "Agg"}, **NUMERICS)  # the pinned float code path
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for i, n in enumerate(chapters, 1):
        src = CHAPTERS[n]
        print(f"[{i}/{len(chapters)}] chapter {n}: python {src} (its progress bars follow)", flush=True)
        t0 = time.time()
        # cwd = notebooks/, as when jupyter runs the chapter
        rc = subprocess.call([sys.executable, str(ROOT / src)], cwd=ROOT / "notebooks", env=env)
        if rc:
            print(f"chapter {n} failed (exit {rc}); docs/results_ch{n}.md left as it was", file=sys.stderr)
            return rc
        print(f"[{i}/{len(chapters)}] chapter {n} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
