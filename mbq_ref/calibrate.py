"""Block-wise (layer-wise) calibration, OmniQuant style (Sec. 4, Alg. 1, App. C.1).

The calibration set runs through the decoder blocks one at a time. For block ``l``:

1. ``Y_fp = F_l(X_fp)``: the full-precision block on full-precision inputs;
2. for each stage, AdamW trains the block's quantization parameters on
   ``MSE(F_l^q(X_q), Y_fp) + Σ_modules calib_loss(stage)``;
3. ``X_q <- F_l^q(X_q)`` and ``X_fp <- Y_fp`` feed block ``l + 1``.

The loop is generic (contract in ``docs/design.md``): a *calibratable* module is
any submodule with ``calib_parameters(stage) -> list[dict]`` (AdamW parameter
groups, ``[]`` = nothing to train) and ``calib_loss(stage)``; ``calib_stage`` is
set to the stage before it runs and to ``None`` (inference) afterwards. Static
PTQ uses the single stage ``"lwc"``; MoBiQuant uses ``("base", "joint")``.

Two rules complete the contract:

* **Learning rates.** A group's ``"lr"`` wins; otherwise ``cfg.lrs[group["name"]]``;
  otherwise ``cfg.lwc_lr``.
* **Full-precision reference.** ``Y_fp`` is computed with every calibratable
  module running ``module.fp_forward(x)`` if it defines one, else
  ``F.linear(x, module.weight, module.bias)`` (see :func:`full_precision`).

LET (OmniQuant's learnable equivalent transformation) is not implemented: the
paper's Sec. 3 observation concerns weight clipping, and LWC alone is the
weight-only baseline here.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .fakequant import decoder_layers, quantize_model

__all__ = [
    "CalibConfig",
    "CalibrationError",
    "BlockLog",
    "CalibLog",
    "calibratable_modules",
    "full_precision",
    "capture_block_inputs",
    "calibrate_blocks",
    "calibrate_static",
]

# kwargs of a decoder-layer call that must not be replayed: each block sees the
# whole window at once, without a KV cache
_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache")


class CalibrationError(RuntimeError):
    """Calibration could not proceed (non-finite loss, bad inputs); the message names the block."""


@dataclass
class CalibConfig:
    """Block-wise calibration settings.

    Attributes:
        nsamples, seqlen: calibration windows (GPTQ sampler, :func:`mbq_ref.data.calibration_windows`).
        epochs: passes over the calibration set per block and stage.
        batch_size: windows per AdamW step.
        lwc_lr: default learning rate (LWC logits).
        wd: AdamW weight decay.
        lrs: learning rate per parameter-group name (e.g. ``{"router": 1e-3}``).
        seed: seeds the sample order of every block (runs are bit-identical).
        dataset: calibration corpus name (informational; callers load the ids).
    """

    nsamples: int = 128
    seqlen: int = 2048
    epochs: int = 20
    batch_size: int = 1
    lwc_lr: float = 1e-2
    wd: float = 0.0
    lrs: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    dataset: str = "wikitext2"

    @classmethod
    def paper(cls) -> CalibConfig:
        """App. C.1 / OmniQuant: 128 x 2048 WikiText-2 windows, 20 epochs, batch 1, ``lwc_lr`` 1e-2, wd 0."""
        return cls()

    @classmethod
    def tiny(cls) -> CalibConfig:
        """The bundled tiny Llama on ``austen``: 32 x 256 windows, 5 epochs, batch 4 (seconds on a CPU).

        40 steps per block instead of the paper's 2560, so the learning rate is
        raised to let the clipping logits move (``σ'(4) ≈ 0.018``).
        """
        return cls(nsamples=32, seqlen=256, epochs=5, batch_size=4, lwc_lr=5e-2, dataset="austen")


@dataclass
class BlockLog:
    """One (block, stage): mean MSE before and after training, and the mean training loss of each epoch."""

    block: int
    stage: str
    init_loss: float
    final_loss: float
    epoch_losses: list[float]
    n_params: int
    seconds: float


@dataclass
class CalibLog:
    """What :func:`calibrate_blocks` did, one :class:`BlockLog` per block and stage."""

    entries: list[BlockLog] = field(default_factory=list)
    seconds: float = 0.0

    def final_losses(self, stage: str | None = None) -> list[float]:
        """Final block MSE per block (of ``stage``, default the last stage run)."""
        stage = stage or self.entries[-1].stage
        return [e.final_loss for e in self.entries if e.stage == stage]

    def init_losses(self, stage: str | None = None) -> list[float]:
        """Block MSE before training per block (of ``stage``, default the first stage run)."""
        stage = stage or self.entries[0].stage
        return [e.init_loss for e in self.entries if e.stage == stage]

    def table(self) -> str:
        """A markdown table of the log."""
        rows = ["| block | stage | params | MSE before | MSE after | s |", "|---|---|---|---|---|---|"]
        rows += [
            f"| {e.block} | {e.stage} | {e.n_params} | {e.init_loss:.4g} | {e.final_loss:.4g} | {e.seconds:.1f} |"
            for e in self.entries
        ]
        return "\n".join(rows)


def calibratable_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules of ``block`` that follow the calibration contract, by name."""
    return [
        (n, m)
        for n, m in block.named_modules()
        if callable(getattr(m, "calib_parameters", None)) and callable(getattr(m, "calib_loss", None))
    ]


@contextlib.contextmanager
def full_precision(block: nn.Module):
    """Run every calibratable module of ``block`` in full precision inside the ``with``."""
    mods = [m for _, m in calibratable_modules(block)]
    for m in mods:
        # an instance attribute shadows the class's forward for nn.Module.__call__
        m.forward = getattr(m, "fp_forward", None) or (lambda x, m=m: F.linear(x, m.weight, m.bias))
    try:
        yield block
    finally:
        for m in mods:
            del m.forward


class _Stop(Exception):
    """Raised by the catcher on decoder layer 0 once its input is recorded."""


def _float_kwargs(kw: dict, device: torch.device) -> dict:
    # fp16/bf16 models calibrate in float32: masks and RoPE tables follow the inputs
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, torch.float32) if v.is_floating_point() else v.to(device)
        if isinstance(v, tuple):
            return tuple(conv(t) for t in v)
        return v

    return {k: conv(v) for k, v in kw.items() if k not in _DROP_KWARGS}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 1):
    """Inputs of decoder layer 0 for every window, and the extra kwargs each layer is called with.

    A pre-hook on each layer records its keyword arguments (attention mask,
    ``position_embeddings`` from ``model.model.rotary_emb``, ``position_ids``, ...)
    during one single-window pass; they have batch dim 1 and broadcast over any
    batch of windows of the same length. Layers may differ (e.g. Qwen2's
    sliding-window layers get their own mask), hence one dict per layer. A
    second hook on layer 0 stops each batch's forward as soon as its input is
    recorded (OmniQuant's "Catcher").

    Args:
        calib_ids: ``[n, T]`` token ids.
    Returns:
        ``(inps, layer_kwargs)``: float32 ``[n, T, d]`` on the model's device, and
        a list of one kwargs dict per layer.
    """
    if calib_ids.ndim != 2:
        raise CalibrationError(f"calib_ids must be [nsamples, seqlen], got shape {tuple(calib_ids.shape)}")
    layers = decoder_layers(model)
    base = getattr(model, "model", model)
    device = next(model.parameters()).device
    layer_kwargs: list[dict | None] = [None] * len(layers)

    def record(i):
        def hook(_mod, _args, kwargs):
            if layer_kwargs[i] is None:
                layer_kwargs[i] = _float_kwargs(kwargs, device)

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        base(input_ids=calib_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    chunks: list[torch.Tensor] = []

    def catch(_mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        chunks.append(hidden.detach().float())
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(calib_ids), batch_size):
            with contextlib.suppress(_Stop):
                base(input_ids=calib_ids[i : i + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(chunks), layer_kwargs


def _block_out(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(x, **kw)
    # transformers < 4.54 returned a tuple from decoder layers, 5.x a tensor
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _run(block: nn.Module, x: torch.Tensor, kw: dict, bs: int) -> torch.Tensor:
    return torch.cat([_block_out(block, x[i : i + bs], kw) for i in range(0, len(x), bs)])


def _param_groups(mods, stage: str, cfg: CalibConfig) -> list[dict]:
    groups = []
    for _, m in mods:
        for g in m.calib_parameters(stage):
            g = dict(g)
            g["params"] = list(g["params"])
            g.setdefault("lr", cfg.lrs.get(g.get("name"), cfg.lwc_lr))
            groups.append(g)
    return [g for g in groups if g["params"]]


def _extra_loss(mods, stage: str) -> torch.Tensor | float:
    return sum((m.calib_loss(stage) for _, m in mods), 0.0)


@torch.no_grad()
def _mse(block, x, y, kw, bs) -> float:
    sse = sum(
        F.mse_loss(_block_out(block, x[i : i + bs], kw), y[i : i + bs], reduction="sum").item()
        for i in range(0, len(x), bs)
    )
    return sse / y.numel()


def _train_stage(i, block, mods, stage, x_q, y_fp, kw, cfg, bar, before_step=None) -> BlockLog:
    t0 = time.perf_counter()
    for _, m in mods:
        m.calib_stage = stage
    groups = _param_groups(mods, stage, cfg)
    params = [p for g in groups for p in g["params"]]
    init = _mse(block, x_q, y_fp, kw, cfg.batch_size)
    epoch_losses: list[float] = []
    if params:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(groups, weight_decay=cfg.wd)
        # one generator per (block, stage): reordering blocks or stages cannot change another's samples
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1009 * i + zlib.crc32(stage.encode()) % 1009)
        for epoch in range(cfg.epochs):
            total = 0.0
            order = torch.randperm(len(x_q), generator=gen)
            for j in range(0, len(order), cfg.batch_size):
                idx = order[j : j + cfg.batch_size]
                if before_step is not None:
                    before_step(i, block, stage, True)
                out = _block_out(block, x_q[idx], kw)
                loss = F.mse_loss(out, y_fp[idx]) + _extra_loss(mods, stage)
                if not torch.isfinite(loss):
                    raise CalibrationError(
                        f"block {i}, stage {stage!r}, epoch {epoch}: loss is {loss.item()}; "
                        "check the block's weights for NaN/inf or lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            epoch_losses.append(total / len(x_q))
            bar.set_postfix(block=i, stage=stage, loss=f"{epoch_losses[-1]:.3g}")
        for p in params:
            p.requires_grad_(False)
    if before_step is not None:
        before_step(i, block, stage, False)  # training over: the final MSE at the stage's own setting
    final = _mse(block, x_q, y_fp, kw, cfg.batch_size) if params else init
    n = sum(p.numel() for p in params)
    return BlockLog(i, stage, init, final, epoch_losses, n, time.perf_counter() - t0)


def calibrate_blocks(
    model: nn.Module,
    calib_ids: torch.Tensor,
    cfg: CalibConfig | None = None,
    stages: tuple[str, ...] = ("lwc",),
    progress: bool = True,
    finish_block=None,
    before_step=None,
) -> CalibLog:
    """Calibrate every decoder block of an already-swapped model, in place (Alg. 1, OmniQuant).

    Args:
        model: HF Llama-family causal LM whose blocks contain calibratable modules
            (e.g. after :func:`mbq_ref.fakequant.quantize_model` with ``method="lwc"``).
            Pretrained weights are frozen; only the modules' parameter groups train.
        calib_ids: ``[nsamples, seqlen]`` token ids.
        cfg: settings (default :meth:`CalibConfig.paper`).
        stages: stage names run in order on each block.
        progress: show a tqdm bar over blocks x stages.
        finish_block: optional ``finish_block(i, block, rerun)`` called after the last
            stage of block ``i``, in inference mode, before its output feeds block ``i + 1``;
            ``rerun()`` runs the calibrated block once over its calibration inputs
            (MoBiQuant's budget settle, :func:`mbq_ref.mobiquant.settle_budget`, uses it).
        before_step: optional ``before_step(i, block, stage, training)`` called before the
            forward of every optimizer step (``training=True``) and once after the stage's
            last step (``training=False``); MoBiQuant draws each step's bit budget with it.
    Returns:
        :class:`CalibLog` with the block MSE before/after each stage.
    Raises:
        CalibrationError: non-finite loss (names the block, stage and epoch) or bad ``calib_ids``.
    """
    cfg = cfg or CalibConfig.paper()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    log = CalibLog()
    try:
        x_fp, layer_kwargs = capture_block_inputs(model, calib_ids, cfg.batch_size)  # [n, T, d]
        x_q = x_fp
        layers = decoder_layers(model)
        bar = tqdm(total=len(layers) * len(stages), desc="calibrate", disable=not progress, leave=False)
        for i, layer in enumerate(layers):
            dtype = next(layer.parameters()).dtype
            layer.float()
            kw = layer_kwargs[i]
            mods = calibratable_modules(layer)
            with full_precision(layer):
                y_fp = _run(layer, x_fp, kw, cfg.batch_size)  # [n, T, d] reference output
            for stage in stages:
                log.entries.append(_train_stage(i, layer, mods, stage, x_q, y_fp, kw, cfg, bar, before_step))
                bar.update(1)
            for _, m in mods:
                m.calib_stage = None
            if finish_block is not None:
                finish_block(i, layer, lambda: _run(layer, x_q, kw, cfg.batch_size))
            # the next block sees what the calibrated quantized block produces
            x_q, x_fp = _run(layer, x_q, kw, cfg.batch_size), y_fp
            layer.to(dtype)
        bar.close()
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
    log.seconds = time.perf_counter() - t0
    return log


def calibrate_static(
    model: nn.Module,
    calib_ids: torch.Tensor,
    bits: int,
    cfg: CalibConfig | None = None,
    group_size: int | None = 128,
    progress: bool = True,
) -> tuple[nn.Module, CalibLog]:
    """OmniQuant-style static PTQ (LWC, no LET): swap in LWC layers at ``bits`` and calibrate.

    Returns:
        ``(model, log)``; ``model`` is the input, modified in place.
    """
    quantize_model(model, bits, group_size, method="lwc")
    return model, calibrate_blocks(model, calib_ids, cfg, stages=("lwc",), progress=progress)
