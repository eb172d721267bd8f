"""Regenerate the example outputs in docs/cli.md by running the commands they show.

    python scripts/cli_examples.py            # every example (about 5-10 min on 2 idle CPU cores)
    python scripts/cli_examples.py eval       # the examples whose name starts with "eval"

Each example in ``docs/cli.md`` sits between two markers::

    <!-- cli-example: NAME -->
    ```console
    $ mbq ...
    (its output)
    ```
    <!-- /cli-example -->

This script runs the commands of every example (``python -m mbq_ref.cli``, this checkout's
package, offline) in one work folder (``--work``, default ``runs/cli_examples/``, git-ignored),
so the relative paths shown (``runs/...``) are the ones the commands wrote there, and writes
the command lines with their real stdout between the markers, atomically, after each
example; nothing else in the file changes. Examples run in the order below because later
ones read the files earlier ones wrote (``quantize`` before ``eval``; ``tour`` before the
static ``eval``). A command that fails stops the script; the examples already done stay
written. The commands run with one torch thread (``OMP_NUM_THREADS=1`` unless set), the
chapters' setting: on a shared 2-core machine two threads were measured many times slower.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
SMOKE = "--nsamples 2 --seqlen 64 --epochs 1 --table-step 1 --threshold-windows 2"  # a smoke calibration

#: name -> the commands of that example, in order (``mbq`` = this checkout's CLI). Commands
#: prefixed with ``!`` are run but not shown (they make the files an example reads).
EXAMPLES: dict[str, list[str]] = {
    "quantize": ["mbq quantize --model tiny-llama --out runs/tiny.mbq.safetensors --no-progress"],
    "eval": [
        "mbq eval runs/tiny.mbq.safetensors --bits 3.0 --batch-size 8 --no-progress",
        "mbq eval runs/tiny.mbq.safetensors --bits 3.0 --batch-size 8 --dataset bible --no-progress",
    ],
    "eval-packed": [
        f"!mbq quantize --model tiny-llama --out runs/smoke.mbq.safetensors --no-progress {SMOKE}",
        "mbq eval runs/smoke.mbq.safetensors --bits 3 --packed --max-windows 2 --seqlen 128 --no-progress",
        "mbq eval runs/smoke.mbq.safetensors --bits 3 --max-windows 2 --seqlen 128 --no-progress",
    ],
    "eval-static": [
        "!mbq tour --quick --out runs/tour --no-progress",
        "mbq eval runs/tour/per_bit/lwc_w3.safetensors --bits 3 --max-windows 16 --seqlen 512 --no-progress",
        "mbq eval runs/tour/per_bit/lwc_w3.safetensors --bits 3 --max-windows 16 --seqlen 512 --dataset bible "
        "--no-progress",
    ],
    "generate": [
        'mbq generate runs/tiny.mbq.safetensors --prompt "It is a truth universally acknowledged" --schedule 2:8,6:16 '
        "--no-progress"
    ],
}

_BLOCK = re.compile(r"(<!-- cli-example: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /cli-example -->)", re.S)


def run_example(name: str, work: Path, env: dict) -> str:
    """The console block of example ``name``: each shown command as ``$ mbq ...`` and its stdout."""
    lines = []
    for cmd in EXAMPLES[name]:
        hidden = cmd.startswith("!")
        argv = shlex.split(cmd.lstrip("!"))
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "mbq_ref.cli", *argv[1:]], cwd=work, env=env, capture_output=True,
                           text=True, check=False)  # fmt: skip
        print(f"  [{name}] {cmd.lstrip('!')[:90]}: exit {r.returncode}, {time.time() - t0:.0f} s", flush=True)
        if r.returncode:
            raise SystemExit(f"`{cmd.lstrip('!')}` failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        if not hidden:
            shown = " ".join(shlex.quote(a) if " " in a else a for a in argv if a != "--no-progress")
            lines += [f"$ {shown}", *r.stdout.rstrip("\n").splitlines()]
    return "```console\n" + "\n".join(lines) + "\n```\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="*", help=f"example name prefixes among {list(EXAMPLES)} (default: all)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "cli_examples"), help="work folder (default: runs/cli_examples)")
    args = ap.parse_args(argv)
    text = DOC.read_text()
    in_doc = {m["name"] for m in _BLOCK.finditer(text)}
    missing = set(EXAMPLES) - in_doc
    if missing or in_doc - set(EXAMPLES):
        ap.error(f"docs/cli.md markers and EXAMPLES disagree: {sorted(missing ^ (in_doc - set(EXAMPLES)))}")
    wanted = [n for n in EXAMPLES if not args.only or any(n.startswith(p) for p in args.only)]
    # an example reads the files of the earlier ones: run the earlier ones too (their blocks are rewritten as well)
    names = list(EXAMPLES)[: max(list(EXAMPLES).index(n) for n in wanted) + 1] if wanted else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        block = run_example(name, work, env)
        text = _BLOCK.sub(lambda m: m[1] + (block if m["name"] == name else m["body"]) + m[4], DOC.read_text())
        tmp_doc = DOC.with_suffix(".md.tmp")
        tmp_doc.write_text(text)
        tmp_doc.replace(DOC)  # atomic: a reader never sees a half-written file
        print(f"rewrote example {name!r} in {DOC.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
