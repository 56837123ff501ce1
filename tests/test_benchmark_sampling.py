"""``benchmarks/sampling.py``: its step variants compute the same guidance (checked inside ``bench_step``) and its
ratios are medians of per-round ratios. Timings themselves are never asserted."""

import pytest

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def sampling():
    with benchmark_module("sampling") as module:
        yield module


def test_ratio_is_the_median_of_paired_rounds(sampling):
    times = {"base": [2.0, 2.0, 4.0], "other": [1.0, 4.0, 6.0]}
    assert sampling.ratio(times, "other", "base") == pytest.approx(1.5)  # rounds: 0.5, 2.0, 1.5
    assert sampling.ratio(times, "base", "base") == 1.0


@pytest.mark.parametrize("n", [1, 2])
def test_step_rows_on_the_shipped_models(sampling, n):
    """One subject: the baseline is CFG with the LoRA merged (generate's path); several: per-sample CFG. Inside,
    HM-CFG in one call is checked against three calls and merged CFG against per-sample CFG."""
    base, hypernet = sampling.load_models(random=False)
    rows = sampling.bench_step(base, hypernet, n, rounds=1)
    first = next(iter(rows))
    assert first == ("CFG, LoRA merged (generate's path for one subject)" if n == 1 else "CFG, per-sample LoRA (2N rows)")
    assert rows[first][1] == 1.0
    for name in ("HM-CFG, one call (3N rows)", "HM-CFG, three calls", "applying the per-sample LoRA (once per image)"):
        assert rows[name][0] > 0
    assert any(name.startswith("UNet alone, 3N rows vs 2N rows") for name in rows)
    assert not any(m._forward_hooks for m in base.unet.modules())  # the LoRA copies are gone, the base left as it was


def test_step_refuses_a_lora_that_does_not_act(sampling):
    """An all-zero LoRA leaves every variant equal to the bare UNet: the benchmark says so rather than time it."""
    base, hypernet = sampling.load_models(random=False)
    zero = lambda refs: hypernet(refs).scaled(0.0)  # noqa: E731
    with pytest.raises(RuntimeError, match="does not change"):
        sampling.bench_step(base, zero, 1, rounds=1)
