"""Seconds per optimizer step of the block-wise calibration, before and after a change, one script for both.

Measures the median wall time of one AdamW step (forward of the block, loss, backward,
step) of :func:`mbq_ref.calibrate.calibrate_blocks` in three stages:

* ``lwc``: static LWC at 4 bits (:func:`mbq_ref.calibrate.calibrate_static`, OmniQuant's baseline);
* ``base``: MoBiQuant's first-slice stage (Alg. 1 stage 1, base slice only);
* ``joint``: MoBiQuant's joint stage (all slices for every token, router and budget).

Each stage runs on the first ``--blocks`` decoder blocks of the model (the rest are cut
off: a step of block ``l`` does not depend on later blocks) with ``--steps`` optimizer
steps per block; a step's time is the interval between two consecutive ``optimizer.step``
returns of the same optimizer (a global post-step hook), so the first step of each
(block, stage) and the MSE passes between stages are not counted. Model settings are the
tour presets (:data:`mbq_ref.tour.MODEL_PRESETS`): ``tiny-llama`` 4 x 256 tokens per step,
group 128; ``smollm2-135m`` 2 x 128 tokens per step, group 64.

Usage (writes ``docs/calibration_speed.md``; "before" is another checkout of the
repository, e.g. ``git archive 321b8d6 | tar -x -C /tmp/before``)::

    python scripts/calibration_speed.py --before /tmp/before --model tiny-llama smollm2-135m

Each measurement runs in a child process whose ``PYTHONPATH`` is the checkout being
measured (``--measure --repo PATH`` prints one JSON line); both use this checkout's
``data/`` folder (``MBQ_DATA_DIR``). The load average (``os.getloadavg``) is recorded
around every child: on a shared machine the numbers are only comparable at similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("lwc", "base", "joint")


def _truncate(model, blocks: int):
    """Keep the first ``blocks`` decoder blocks (a calibration step of block ``l`` never reads later blocks)."""
    from torch import nn

    base = model.model
    base.layers = nn.ModuleList(list(base.layers)[:blocks])
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    return model


def measure(model_name: str, blocks: int, steps: int, threads: int, stages) -> dict:
    """Median seconds per optimizer step per stage in this process (imports ``mbq_ref`` from ``sys.path``)."""
    from dataclasses import replace

    import torch
    import torch.optim.optimizer as optim_mod

    import mbq_ref
    import mbq_ref.calibrate as calibrate_mod
    from mbq_ref.calibrate import calibrate_static
    from mbq_ref.data import calibration_windows, load_corpus, tokenize_corpus
    from mbq_ref.mobiquant import MoBiConfig, quantize_mobiquant
    from mbq_ref.tour import MODEL_PRESETS
    from mbq_ref.zoo import load_model

    torch.set_num_threads(threads)
    preset = MODEL_PRESETS[model_name]
    cfg = MoBiConfig.tiny()
    calib = replace(cfg.calib, **{k: v for k, v in preset.get("calib", {}).items() if k in ("seqlen", "batch_size")})
    # steps + 1 batches per block and stage, one epoch: the first step of each is not timed
    calib = replace(calib, nsamples=calib.batch_size * (steps + 1), epochs=1)
    cfg = replace(cfg, group_size=preset.get("group_size", 128), calib=calib)
    _, tok = load_model(model_name, with_tokenizer=True)
    train = tokenize_corpus(tok, load_corpus(calib.dataset, "train"))
    ids = calibration_windows(train, calib.nsamples, calib.seqlen, seed=0)

    times: dict[str, list[float]] = {s: [] for s in stages}
    state = {"opt": None, "t": 0.0, "mods": []}

    def post(opt, _args, _kwargs):
        now = time.perf_counter()
        if opt is state["opt"]:
            stage = next((m.calib_stage for m in state["mods"] if m.calib_stage is not None), None)
            times[stage].append(now - state["t"])
        state["opt"], state["t"] = opt, now

    handle = optim_mod.register_optimizer_step_post_hook(post)
    out = {"model": model_name, "repo": str(Path(mbq_ref.__file__).resolve().parent.parent), "threads": threads,
           "tokens_per_step": calib.batch_size * calib.seqlen, "blocks": blocks, "steps": steps}  # fmt: skip
    try:
        for method in ("lwc", "mobiquant"):
            model = _truncate(load_model(model_name), blocks)
            state.update(opt=None, mods=[])
            # the modules calibrate_blocks trains (calib_stage says which stage a step belongs to)
            orig = calibrate_mod.calibratable_modules

            def spy(block, orig=orig):
                found = orig(block)
                state["mods"] = [m for _, m in found]
                return found

            calibrate_mod.calibratable_modules = spy
            t0 = time.perf_counter()
            try:
                if method == "lwc":
                    calibrate_static(model, ids, 4, calib, cfg.group_size, progress=False)
                else:
                    quantize_mobiquant(model, ids, cfg, progress=False)
            finally:
                calibrate_mod.calibratable_modules = orig
            out[f"{method}_wall_s"] = time.perf_counter() - t0
    finally:
        handle.remove()
    out["seconds_per_step"] = {s: statistics.median(v) for s, v in times.items() if v}
    out["samples"] = {s: len(v) for s, v in times.items()}
    return out


def run_child(repo: Path, model: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), MBQ_DATA_DIR=str(ROOT / "data"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--model", model, "--blocks", str(args.blocks),
           "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
    load0 = os.getloadavg()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(repo))
    if res.returncode:
        raise SystemExit(f"measurement in {repo} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load"] = [round(x, 2) for x in load0] + [round(x, 2) for x in os.getloadavg()]
    return out


def table(rows: list[dict], command: str) -> str:
    lines = [
        "| model | stage | tokens/step | threads | before s/step | after s/step | speed-up | load 1/5/15 min before | load after | ",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        for s in STAGES:
            tb, ta = b["seconds_per_step"].get(s), a["seconds_per_step"].get(s)
            if tb is None or ta is None:
                continue
            lb = "/".join(f"{x:.2f}" for x in b["load"][:3])
            la = "/".join(f"{x:.2f}" for x in a["load"][:3])
            lines.append(
                f"| {r['model']} | {s} | {a['tokens_per_step']} | {a['threads']} | {tb:.3f} | {ta:.3f} | "
                f"{tb / ta:.2f}x | {lb} | {la} |"
            )
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["tiny-llama", "smollm2-135m"], choices=("tiny-llama", "smollm2-135m"))
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks calibrated (default 2)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per block and stage (default 4)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--before", type=Path, help="checkout measured as 'before' (its PYTHONPATH root)")
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout measured as 'after' (default: this one)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "calibration_speed_table.md",
                   help="markdown table written here")  # fmt: skip
    p.add_argument("--measure", action="store_true", help="(internal) measure in this process, print one JSON line")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.model[0], args.blocks, args.steps, args.threads, STAGES)))
        return
    if args.before is None:
        p.error("--before PATH is required (a checkout of the commit to compare with)")
    rows = []
    for model in args.model:
        before = run_child(args.before.resolve(), model, args)
        after = run_child(args.repo.resolve(), model, args)
        rows.append({"model": model, "before": before, "after": after})
        print(json.dumps(rows[-1]), flush=True)
    command = "python scripts/calibration_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.write_text(table(rows, command))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
