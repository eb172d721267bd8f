"""Seconds per optimizer step of the block-wise calibration, before and after a change, one script for both.

Measures the wall time (median and minimum) and the process CPU time (median) of one AdamW
step (forward of the block, loss, backward, step) of :func:`mbq_ref.calibrate.calibrate_blocks`
in three stages:

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

Usage (rewrites the section of ``docs/calibration_speed.md`` for that thread count; "before"
is another checkout of the package, e.g.
``mkdir -p /tmp/before && git archive 321b8d6 mbq_ref | tar -x -C /tmp/before``)::

    python scripts/calibration_speed.py --before /tmp/before --threads 1 --blocks 1 --steps 4 --repeat 2

Each measurement runs in a child process whose ``PYTHONPATH`` is the checkout being
measured (``--before`` and ``--repo``, default this one); both use this checkout's
``data/`` folder (``MBQ_DATA_DIR``). The load average (``os.getloadavg``) is recorded
around every child: on a shared machine the numbers are only comparable at similar load.
``--measure`` (with ``PYTHONPATH`` set by hand) measures in the current process and prints
one JSON line; ``--measure --profile joint`` adds :mod:`torch.profiler` operator shares.
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


MATMUL_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)  # fmt: skip


def measure(model_name: str, blocks: int, steps: int, threads: int, stages, profile: str | None = None) -> dict:
    """Median seconds per optimizer step per stage in this process (imports ``mbq_ref`` from ``sys.path``).

    ``profile``: also run :mod:`torch.profiler` over the timed steps of that stage (block 0)
    and return the share of CPU time per operator (``"profile"``).
    """
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
    cpu: dict[str, list[float]] = {s: [] for s in stages}
    state = {"opt": None, "t": 0.0, "c": 0.0, "mods": []}

    prof = {"p": None, "n": 0}

    def post(opt, _args, _kwargs):
        now, now_cpu = time.perf_counter(), time.process_time()
        stage = next((m.calib_stage for m in state["mods"] if m.calib_stage is not None), None)
        if opt is state["opt"]:
            times[stage].append(now - state["t"])
            cpu[stage].append(now_cpu - state["c"])
        if profile == stage and prof["n"] <= steps:  # the timed steps of the first block of that stage
            prof["n"] += 1
            if prof["n"] == 1:
                prof["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof["p"].start()
            elif prof["n"] == steps + 1:
                prof["p"].stop()
        state["opt"], state["t"], state["c"] = opt, time.perf_counter(), time.process_time()

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
    # CPU seconds of the process (all threads): less sensitive than wall time to other processes' load
    out["cpu_seconds_per_step"] = {s: statistics.median(v) for s, v in cpu.items() if v}
    out["samples"] = {s: len(v) for s, v in times.items()}
    out["times"], out["cpu_times"] = times, cpu
    if prof["p"] is not None:
        ev = [e for e in prof["p"].key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in ev)
        mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL_OPS)
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
        out["profile"] = {
            "stage": profile, "steps": steps, "matmul_share": mm / total, "self_cpu_s_per_step": total / 1e6 / steps,
            "top": [(e.key, round(e.self_cpu_time_total / total, 4), e.count // steps) for e in top],
        }  # fmt: skip
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


def _pooled(runs: list[dict], key: str, stage: str, how=statistics.median) -> float | None:
    vals = [t for r in runs for t in r[key].get(stage, [])]
    return how(vals) if vals else None


def _load(runs: list[dict]) -> str:
    """1-minute load average over the runs of one side: lowest..highest seen at their starts and ends."""
    ones = [r["load"][0] for r in runs] + [r["load"][3] for r in runs]
    return f"{min(ones):.1f}..{max(ones):.1f}"


def table(rows: list[dict], command: str) -> str:
    lines = [
        "| model | stage | tokens/step | before s/step median (min) | after s/step median (min) "
        "| speed-up median (min) | CPU s/step before / after | load before | load after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        for s in STAGES:
            tb, ta = _pooled(b, "times", s), _pooled(a, "times", s)
            mb, ma = _pooled(b, "times", s, min), _pooled(a, "times", s, min)
            cb, ca = _pooled(b, "cpu_times", s), _pooled(a, "cpu_times", s)
            if None in (tb, ta, cb, ca):
                continue
            lines.append(
                f"| {r['model']} | {s} | {a[0]['tokens_per_step']} | {tb:.3f} ({mb:.3f}) | {ta:.3f} ({ma:.3f}) | "
                f"{tb / ta:.2f}x ({mb / ma:.2f}x) | {cb:.3f} / {ca:.3f} | {_load(b)} | {_load(a)} |"
            )
    first = rows[0]["after"][0] if rows else {}
    return (
        "\n".join(lines)
        + f"\n\n{first.get('threads')} torch threads; {first.get('steps')} timed steps per block and stage on the "
        f"first {first.get('blocks')} blocks, {len(rows[0]['after']) if rows else 0} runs per side, before and after "
        "alternated; medians (and minima) over all timed steps of a side; CPU s/step: process CPU time (all "
        "threads), median. Load: 1-minute `os.getloadavg()` at the start and end of each run, lowest..highest "
        "(the machine has 2 cores).\n\n"
        f"Command: `{command}`\n"
    )


def _markers(threads: int) -> tuple[str, str]:
    tag = f"<!-- calibration_speed.py threads={threads}"
    return (f"{tag}: begin -->", f"{tag}: end -->")


def write_doc(path: Path, text: str, threads: int) -> None:
    """Replace the generated section of ``path`` for this thread count (between its markers), or append one."""
    begin, end = _markers(threads)
    block = f"{begin}\n{text}{end}"
    old = path.read_text() if path.exists() else "# Calibration speed\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        path.write_text(head + block + rest.split(end, 1)[1])
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + block + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ("tiny-llama", "smollm2-135m")
    p.add_argument("--model", nargs="+", default=list(models), choices=models)
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks calibrated (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per block and stage (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeat", type=int, default=2, help="runs per side, before and after alternated (default 2)")
    p.add_argument("--before", type=Path, help="checkout measured as 'before' (its PYTHONPATH root)")
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout measured as 'after' (default: this one)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "calibration_speed.md",
                   help="markdown file whose generated section is rewritten")  # fmt: skip
    p.add_argument("--measure", action="store_true", help="measure in this process (its mbq_ref), print one JSON line")
    p.add_argument("--profile", choices=STAGES, help="with --measure: torch.profiler operator shares of that stage")
    args = p.parse_args(argv)
    if args.measure:
        out = measure(args.model[0], args.blocks, args.steps, args.threads, STAGES, args.profile)
        if "profile" in out:  # readable first, the JSON line last
            pr = out["profile"]
            print(f"{args.model[0]} {pr['stage']}: matmul share {pr['matmul_share']:.1%} of "
                  f"{pr['self_cpu_s_per_step']:.3f} s CPU per step; top operators (share, calls per step):")
            for key, share, calls in pr["top"]:
                print(f"  {key:60s} {share:6.1%} {calls:5d}")
        print(json.dumps(out))
        return
    if args.before is None:
        p.error("--before PATH is required (a checkout of the commit to compare with)")
    rows = []
    for model in args.model:
        row = {"model": model, "before": [], "after": []}
        for _ in range(args.repeat):
            row["before"].append(run_child(args.before.resolve(), model, args))
            row["after"].append(run_child(args.repo.resolve(), model, args))
            progress = {k: [(r["seconds_per_step"], r["load"]) for r in row[k]] for k in ("before", "after")}
            print(json.dumps(progress), flush=True)
        rows.append(row)
    command = "python scripts/calibration_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, command)
    write_doc(args.out, text, args.threads)
    print(text)


if __name__ == "__main__":
    main()
