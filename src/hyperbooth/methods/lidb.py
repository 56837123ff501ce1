"""Lightweight DreamBooth (LiDB): the low-dimensional weight space HyperDreamBooth predicts in.

Ruiz et al., "HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models" (2023), Sec. 4.1.
A rank-r LoRA of a layer ``W (d_out, d_in)`` is factored once more through frozen random orthogonal bases:

    A = A_train · A_aux        A_train (r, a),   A_aux (a, d_in)     rows orthonormal
    B = B_aux · B_train        B_aux (d_out, b), B_train (b, r)      columns orthonormal
    ΔW = (alpha / r) · B A

Only ``A_train`` and ``B_train`` are personalized: ``r · (a + b)`` numbers per layer (the paper: r = 1, a = 100,
b = 50, about 30 k variables over SD 1.5's attention layers). The bases come from a per-layer seed
(:func:`layer_seed`), so the same seed gives the same bases on every machine. Where a layer is narrower than ``a`` (``d_in < a``) or ``b`` (``d_out < b``) — the world's 64- and
128-wide layers — the basis is square and orthogonal (``a_l = min(a, d_in)``, ``b_l = min(b, d_out)``).

Everything here is a pure function; the output is ordinary :class:`~hyperbooth.lora.weights.LoRAWeights`, so
export, injection, HM-CFG and mixing need nothing new.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from hyperbooth.errors import ConfigError
from hyperbooth.lora.weights import LoRALayer, LoRAWeights

#: The paper's LiDB sizes: rank 1, down dimension 100, up dimension 50.
DEFAULT_RANK, DEFAULT_A, DEFAULT_B = 1, 100, 50


def layer_seed(seed: int, name: str) -> int:
    """The seed of one layer's bases: ``seed`` and the layer's name (CRC-32), the same on every machine and run."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def orthonormal_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """``(n, d)`` float32 with orthonormal rows (``n <= d``): the QR of a Gaussian matrix drawn from ``seed`` (signs
    fixed by ``R``'s diagonal, so the result is Haar-distributed and deterministic)."""
    if not 1 <= n <= d:
        raise ConfigError(f"orthonormal rows need 1 <= n <= d, got n={n}, d={d}")
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))  # q (d, n)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.contiguous().float()


def aux_bases(shapes: Mapping[str, tuple[int, int]], a: int = DEFAULT_A, b: int = DEFAULT_B, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target layer (name → ``(d_in, d_out)``, as :func:`hyperbooth.lora.target_shapes` gives) the frozen bases
    ``(A_aux (a_l, d_in), B_aux (d_out, b_l))`` with ``a_l = min(a, d_in)``, ``b_l = min(b, d_out)``."""
    if a < 1 or b < 1:
        raise ConfigError(f"LiDB dimensions a={a}, b={b} must be at least 1")
    out = {}
    for name, (d_in, d_out) in shapes.items():
        s = layer_seed(seed, name)
        A_aux = orthonormal_rows(min(a, d_in), d_in, s)  # (a_l, d_in)
        B_aux = orthonormal_rows(min(b, d_out), d_out, s + 1).T.contiguous()  # (d_out, b_l)
        out[name] = (A_aux, B_aux)
    return out


def lidb_layer(A_train: torch.Tensor, B_train: torch.Tensor, A_aux: torch.Tensor, B_aux: torch.Tensor, alpha: float) -> LoRALayer:
    """One layer's LoRA from its LiDB variables: ``A_train (N, r, a_l)``, ``B_train (N, b_l, r)`` → ``A (N, r, d_in)``,
    ``B (N, d_out, r)``."""
    if A_train.ndim != 3 or B_train.ndim != 3:
        raise ConfigError(f"LiDB variables must be A_train (N, r, a) and B_train (N, b, r); got {tuple(A_train.shape)} and {tuple(B_train.shape)}")
    if A_train.shape[2] != A_aux.shape[0] or B_train.shape[1] != B_aux.shape[1]:
        raise ConfigError(f"LiDB variables A_train {tuple(A_train.shape)} / B_train {tuple(B_train.shape)} do not fit the bases "
                          f"A_aux {tuple(A_aux.shape)} / B_aux {tuple(B_aux.shape)}")
    A = A_train @ A_aux.to(A_train)  # (N, r, a_l) @ (a_l, d_in) → (N, r, d_in)
    B = B_aux.to(B_train) @ B_train  # (d_out, b_l) @ (N, b_l, r) → (N, d_out, r)
    return LoRALayer(A, B, alpha)


def lidb_weights(variables: Mapping[str, tuple[torch.Tensor, torch.Tensor]], bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> LoRAWeights:
    """name → ``(A_train, B_train)`` and the bases of :func:`aux_bases` → :class:`LoRAWeights`; every layer of
    ``variables`` needs its bases (the first missing one is named)."""
    missing = [name for name in variables if name not in bases]
    if missing:
        raise ConfigError(f"no LiDB bases for layer {missing[0]!r}")
    return LoRAWeights({name: lidb_layer(A_t, B_t, *bases[name], alpha) for name, (A_t, B_t) in variables.items()})


def num_variables(shapes: Mapping[str, tuple[int, int]], rank: int = DEFAULT_RANK, a: int = DEFAULT_A, b: int = DEFAULT_B) -> int:
    """The personalized numbers per subject: ``Σ_l r · (a_l + b_l)``."""
    return sum(rank * (min(a, d_in) + min(b, d_out)) for d_in, d_out in shapes.values())
