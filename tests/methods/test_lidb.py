import pytest
import torch

from hyperbooth.errors import ConfigError
from hyperbooth.methods.lidb import aux_bases, layer_seed, lidb_layer, lidb_weights, num_variables, orthonormal_rows

SHAPES = {"down.attn1.to_q": (64, 64), "down.attn2.to_k": (384, 64), "up.ff.net.2": (512, 128)}


def test_orthonormal_rows_are_orthonormal_and_deterministic():
    q = orthonormal_rows(20, 64, seed=3)
    assert q.shape == (20, 64) and q.dtype == torch.float32
    torch.testing.assert_close(q @ q.T, torch.eye(20), atol=1e-5, rtol=0)
    assert torch.equal(q, orthonormal_rows(20, 64, seed=3))
    assert not torch.allclose(q, orthonormal_rows(20, 64, seed=4))
    square = orthonormal_rows(8, 8, seed=0)
    torch.testing.assert_close(square.T @ square, torch.eye(8), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="n=9, d=8"):
        orthonormal_rows(9, 8, seed=0)


def test_aux_bases_shapes_per_layer_and_seeds():
    bases = aux_bases(SHAPES, a=100, b=50, seed=1)
    # a layer narrower than a or b gets a square orthogonal basis
    assert [tuple(bases[n][0].shape) for n in SHAPES] == [(64, 64), (100, 384), (100, 512)]
    assert [tuple(bases[n][1].shape) for n in SHAPES] == [(64, 50), (64, 50), (128, 50)]
    for A_aux, B_aux in bases.values():
        torch.testing.assert_close(A_aux @ A_aux.T, torch.eye(A_aux.shape[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(B_aux.T @ B_aux, torch.eye(B_aux.shape[1]), atol=1e-5, rtol=0)
    again = aux_bases(SHAPES, a=100, b=50, seed=1)
    assert all(torch.equal(bases[n][0], again[n][0]) and torch.equal(bases[n][1], again[n][1]) for n in SHAPES)
    other = aux_bases(SHAPES, a=100, b=50, seed=2)
    assert not torch.allclose(bases["up.ff.net.2"][0], other["up.ff.net.2"][0])
    assert layer_seed(1, "a") != layer_seed(1, "b") and layer_seed(1, "a") == layer_seed(1, "a")


def test_lidb_layer_is_the_product_of_the_factors():
    torch.manual_seed(0)
    A_aux, B_aux = aux_bases({"m": (384, 128)}, a=100, b=50)["m"]
    A_train, B_train = torch.randn(3, 2, 100), torch.randn(3, 50, 2)
    layer = lidb_layer(A_train, B_train, A_aux, B_aux, alpha=2.0)
    assert layer.A.shape == (3, 2, 384) and layer.B.shape == (3, 128, 2) and layer.alpha == 2.0
    for i in range(3):
        expected = (2.0 / 2) * (B_aux @ B_train[i]) @ (A_train[i] @ A_aux)
        torch.testing.assert_close(layer.delta()[i], expected, atol=1e-4, rtol=1e-4)
    # orthonormal bases keep norms: ‖A‖ = ‖A_train‖, ‖B‖ = ‖B_train‖
    torch.testing.assert_close(layer.A.norm(), A_train.norm(), rtol=1e-4, atol=0)
    torch.testing.assert_close(layer.B.norm(), B_train.norm(), rtol=1e-4, atol=0)
    # gradients reach the personalized variables only through the frozen bases
    A_train.requires_grad_(True)
    lidb_layer(A_train, B_train, A_aux, B_aux, 1.0).delta().sum().backward()
    assert A_train.grad is not None and A_train.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="do not fit the bases"):
        lidb_layer(torch.randn(3, 2, 99), B_train, A_aux, B_aux, 1.0)
    with pytest.raises(ConfigError, match=r"A_train \(N, r, a\)"):
        lidb_layer(torch.randn(2, 100), B_train, A_aux, B_aux, 1.0)


def test_lidb_weights_and_variable_count():
    bases = aux_bases(SHAPES, a=100, b=50)
    variables = {n: (torch.randn(2, 1, bases[n][0].shape[0]), torch.randn(2, bases[n][1].shape[1], 1)) for n in SHAPES}
    weights = lidb_weights(variables, bases, alpha=1.0)
    assert weights.shapes == SHAPES and weights.num_subjects == 2 and set(weights.ranks.values()) == {1}
    assert num_variables(SHAPES, rank=1, a=100, b=50) == (64 + 50) + (100 + 50) + (100 + 50)
    assert num_variables(SHAPES, rank=1, a=100, b=50) == sum(v[0][0].numel() + v[1][0].numel() for v in variables.values())
    with pytest.raises(ConfigError, match="'extra'"):
        lidb_weights({**variables, "extra": variables["up.ff.net.2"]}, bases, alpha=1.0)
    with pytest.raises(ConfigError, match="a=0"):
        aux_bases(SHAPES, a=0)
