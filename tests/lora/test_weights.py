import pytest
import torch

from hyperbooth.errors import ConfigError
from hyperbooth.lora import LoRALayer, LoRAWeights, combine, frobenius_sq, stack

SHAPES = {"a.to_q": (8, 6), "a.to_k": (5, 8)}


def _weights(n=3, rank=2, seed=0, alpha=None):
    return LoRAWeights.random(SHAPES, rank=rank, num_subjects=n, alpha=alpha, std=0.5, generator=torch.Generator().manual_seed(seed))


def test_delta_matches_formula():
    layer = LoRALayer(torch.randn(2, 3, 5), torch.randn(2, 4, 3), alpha=6.0)
    expected = torch.stack([(6.0 / 3) * layer.B[i] @ layer.A[i] for i in range(2)])
    torch.testing.assert_close(layer.delta(), expected)


def test_frobenius_sq_equals_norm_of_delta():
    w = _weights(alpha=3.0)
    expected = sum(d.pow(2).sum(dim=(1, 2)) for d in w.deltas().values())
    torch.testing.assert_close(w.frobenius_sq(), expected)
    torch.testing.assert_close(frobenius_sq(w["a.to_q"]), w["a.to_q"].delta().pow(2).sum(dim=(1, 2)))


@pytest.mark.parametrize(
    "A,B,alpha,match",
    [
        (torch.randn(2, 3), torch.randn(2, 4, 3), 1.0, "A \\(N, r, d_in\\)"),
        (torch.randn(2, 3, 5), torch.randn(3, 4, 3), 1.0, "same N and rank"),
        (torch.randn(2, 3, 5), torch.randn(2, 4, 2), 1.0, "same N and rank"),
        (torch.randn(2, 3, 5), torch.randn(2, 4, 3).double(), 1.0, "dtype"),
        (torch.randint(0, 3, (2, 3, 5)), torch.randint(0, 3, (2, 4, 3)), 1.0, "dtype"),
        (torch.randn(2, 3, 5), torch.randn(2, 4, 3), 0.0, "alpha"),
        (torch.randn(2, 3, 5), torch.randn(2, 4, 3), float("nan"), "alpha"),
    ],
)
def test_layer_validation(A, B, alpha, match):
    with pytest.raises(ConfigError, match=match):
        LoRALayer(A, B, alpha)


def test_weights_validation_names_layer():
    good = LoRALayer(torch.randn(2, 1, 3), torch.randn(2, 3, 1), 1.0)
    other_n = LoRALayer(torch.randn(3, 1, 3), torch.randn(3, 3, 1), 1.0)
    with pytest.raises(ConfigError, match="'second' has 3"):
        LoRAWeights({"first": good, "second": other_n})
    with pytest.raises(ConfigError, match="at least one"):
        LoRAWeights({})


def test_to_select_detach_scaled():
    w = _weights()
    assert w.to(dtype=torch.float64).dtype == torch.float64
    one = w.select(1)
    assert one.num_subjects == 1
    torch.testing.assert_close(one["a.to_q"].A[0], w["a.to_q"].A[1])
    with pytest.raises(ConfigError, match="out of range"):
        w.select(5)
    torch.testing.assert_close(w.scaled(0.5).deltas()["a.to_k"], 0.5 * w.deltas()["a.to_k"])
    assert not w.detach()["a.to_q"].A.requires_grad


def test_mean_is_exact_mean_of_deltas():
    w = _weights(n=3, rank=2, alpha=4.0)
    m = w.mean()
    assert m.num_subjects == 1 and m.ranks["a.to_q"] == 6
    for name, d in w.deltas().items():
        torch.testing.assert_close(m.deltas()[name][0], d.mean(dim=0), rtol=1e-5, atol=1e-6)


def test_lerp_and_concat_are_exact():
    a, b = _weights(n=2, rank=2, seed=1, alpha=1.0), _weights(n=2, rank=3, seed=2, alpha=5.0)
    for name in SHAPES:
        da, db = a.deltas()[name], b.deltas()[name]
        torch.testing.assert_close(a.lerp(b, 0.25).deltas()[name], 0.75 * da + 0.25 * db, rtol=1e-5, atol=1e-6)
        cat = a.concat(b)
        assert cat.ranks[name] == 5
        torch.testing.assert_close(cat.deltas()[name], da + db, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.lerp(b, 0.0).deltas()["a.to_q"], a.deltas()["a.to_q"], rtol=1e-5, atol=1e-6)


def test_combine_rejects_mismatched_targets():
    a = _weights()
    b = LoRAWeights({"a.to_q": a["a.to_q"]})
    with pytest.raises(ConfigError, match="a.to_k"):
        combine([a, b], [1.0, 1.0])
    with pytest.raises(ConfigError, match="coefficients"):
        combine([a, a], [1.0])


def test_unit_scale_preserves_delta():
    w = _weights(alpha=7.0)
    u = w.with_unit_scale()
    assert all(layer.alpha == layer.rank for layer in u.values())
    for name in SHAPES:
        torch.testing.assert_close(u.deltas()[name], w.deltas()[name])


def test_stack_concatenates_subjects_exactly_across_alphas():
    a, b = _weights(n=2, seed=1, alpha=4.0), _weights(n=1, seed=2, alpha=1.0)
    s = stack([a, b])
    assert s.num_subjects == 3
    for name in SHAPES:
        torch.testing.assert_close(s.deltas()[name][:2], a.deltas()[name])
        torch.testing.assert_close(s.deltas()[name][2:], b.deltas()[name])
    with pytest.raises(ConfigError, match="rank 3"):
        stack([a, _weights(n=1, rank=3)])
    with pytest.raises(ConfigError, match="a.to_k"):
        stack([a, LoRAWeights({"a.to_q": a["a.to_q"]})])
    with pytest.raises(ConfigError, match="at least one"):
        stack([])
