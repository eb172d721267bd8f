"""Routing controls (mbq_ref.routing_controls): same bits as the router, different token choices."""

import pytest
import torch
from helpers import random_llama

from mbq_ref.calibrate import CalibConfig
from mbq_ref.errors import MBQError
from mbq_ref.mobiquant import MoBiConfig, average_bits, bit_stats, mobi_layers, quantize_mobiquant
from mbq_ref.mobiroute import slice_counts
from mbq_ref.routing_controls import (
    CONTROLS,
    compare_controls,
    layer_errors,
    mix_train_bits,
    oracle_routing,
    paired_delta,
    random_routing,
    static_mix,
)
from mbq_ref.thresholds import threshold_table

VOCAB = 256


def _ids(n=4, t=64, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = random_llama(hidden=128, layers=1, vocab=VOCAB)
    cfg = MoBiConfig(group_size=64, router_lr=1e-2, calib=CalibConfig(nsamples=4, seqlen=64, epochs=1, batch_size=2))
    quantize_mobiquant(m, _ids(), cfg, progress=False)
    return m


def test_random_and_oracle_keep_the_router_histogram(model):
    layer = next(iter(mobi_layers(model).values()))
    x = torch.randn(3, 50, layer.in_features, generator=torch.Generator().manual_seed(1))
    k = slice_counts(layer.router(x), layer.tau_logit)
    for policy in (random_routing(0), oracle_routing()):
        got = policy(layer, x)
        assert got.shape == k.shape and torch.equal(got.flatten().sort().values, k.flatten().sort().values)
    # the oracle gives the most slices to the largest base-slice error
    got = oracle_routing()(layer, x).flatten()
    err = ((x.reshape(-1, layer.in_features) @ (layer.weight - layer.dequant(1)).T) ** 2).sum(-1)
    assert got[err.argmax()] == k.max() and got[err.argmin()] == k.min()


def test_static_mix_stays_within_budget_and_grows(model):
    errs = layer_errors(model, _ids())
    sizes = {n: m.in_features * m.out_features for n, m in mobi_layers(model).items()}
    prev = None
    for target in (2.0, 3.0, 5.0, 8.0):
        mix = static_mix(model, errs, target)
        bits = sum(sizes[n] * 2 * k for n, k in mix.items()) / sum(sizes.values())  # slices 2,2,2,2
        assert bits <= target + 1e-9
        if prev is not None:
            assert all(mix[n] >= prev[n] for n in mix)  # a larger budget never takes bits away
        prev = mix
    assert set(mix.values()) == {4}  # 8 bits: every layer whole


def test_mix_train_bits_keeps_the_average_and_the_order(model):
    """Budgets from a static mix: weighted mean = target, inside the margin, ordered as the mix's widths."""
    errs = layer_errors(model, _ids())
    sizes = {n: m.in_features * m.out_features for n, m in mobi_layers(model).items()}
    for target in (2.5, 3.0, 5.0):
        mix = static_mix(model, errs, target)
        b = mix_train_bits(model, mix, target, margin=0.25)
        assert set(b) == set(mix)
        assert sum(sizes[n] * v for n, v in b.items()) / sum(sizes.values()) == pytest.approx(target, abs=1e-6)
        assert all(2.25 - 1e-9 <= v <= 7.75 + 1e-9 for v in b.values())
        for n in mix:  # a layer the mix gives more slices never gets a smaller budget
            assert all(b[n] >= b[o] - 1e-9 for o in mix if mix[n] > mix[o])
    # a mix of equal widths gives every layer the target
    assert all(v == pytest.approx(3.0, abs=1e-6) for v in mix_train_bits(model, dict.fromkeys(sizes, 1), 3.0).values())
    with pytest.raises(MBQError, match="outside the trainable range"):
        mix_train_bits(model, mix, 7.9)


def test_compare_controls_equal_bits_and_paired_deltas(model):
    table = threshold_table(model, _ids(), [3.0])
    test = torch.randint(0, VOCAB, (4 * 64,), generator=torch.Generator().manual_seed(5))
    (row,) = compare_controls(model, table, _ids(), test, seqlen=64, max_windows=4)
    assert set(CONTROLS) <= set(row) and row["target"] == 3.0
    assert row["router"]["delta_nll"] == 0.0 and row["router"]["se"] == 0.0
    assert row["static"]["bits"] <= 3.0 + 1e-9
    d, se = paired_delta(row["random"]["window_nll"], row["router"]["window_nll"])
    assert (d, se) == (row["random"]["delta_nll"], row["random"]["se"]) and se >= 0
    # the model is left routing with the router again (no override, no fixed width)
    assert all(m.token_slices is None and m.fixed_k is None for m in mobi_layers(model).values())
    assert average_bits(model) > 0 and all(s.tokens > 0 for s in bit_stats(model).values())
