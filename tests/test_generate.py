"""mbq_ref.generate: argument checks of generate() (the end-to-end runs are in tests/test_cli.py)."""

import math

import pytest

from mbq_ref.generate import GenerateError, generate


@pytest.mark.parametrize(
    "kw,match",
    [({"temperature": -1.0}, "temperature"), ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
     ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k")],
    ids=["temperature-negative", "temperature-nan", "temperature-inf", "top-k-negative", "top-k-float"],
)  # fmt: skip
def test_bad_sampling_settings_refused(kw, match):
    """Checked before the model or the tokenizer is touched (so None stands in for both)."""
    with pytest.raises(GenerateError, match=match):
        generate(None, None, "x", lambda b: None, **kw)
