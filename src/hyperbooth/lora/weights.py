"""`LoRAWeights`: the one currency between hyperbooth's parts.

A LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) adds to a frozen weight
``W: (d_out, d_in)`` the low-rank update

    ΔW = (alpha / r) · B A,        A: (r, d_in),  B: (d_out, r)

hyperbooth carries a *batch* of N such updates per target module (one per subject, as a hypernetwork predicts
them), so for each target module name:

    A: (N, r, d_in)    B: (N, d_out, r)    alpha: float

Decoders produce it, the injector consumes it, export writes it, fine-tuning refines it, and interpolation or
multi-image averaging act on it. Every combination here (:func:`combine` and what builds on it) is exact in ΔW
space: it concatenates factors along the rank axis instead of averaging them, so the rank of the result is the sum
of the ranks combined.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from hyperbooth.errors import ConfigError


@dataclass(frozen=True)
class LoRALayer:
    """The LoRA factors of one target module for N subjects: ``A (N, r, d_in)``, ``B (N, d_out, r)``, ``alpha``."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        A, B = self.A, self.B
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            raise ConfigError(f"LoRA factors must be tensors, got A={type(A).__name__}, B={type(B).__name__}")
        if A.ndim != 3 or B.ndim != 3:
            raise ConfigError(f"LoRA factors must be A (N, r, d_in) and B (N, d_out, r); got {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
            raise ConfigError(f"LoRA factors disagree: A {tuple(A.shape)} and B {tuple(B.shape)} need the same N and rank")
        if A.shape[1] < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got A {tuple(A.shape)}")
        if not A.is_floating_point() or A.dtype != B.dtype:
            raise ConfigError(f"LoRA factors must share one floating dtype, got {A.dtype} and {B.dtype}")
        if A.device != B.device:
            raise ConfigError(f"LoRA factors must be on one device, got {A.device} and {B.device}")
        alpha = float(self.alpha)
        if not (alpha > 0 and alpha < float("inf")):
            raise ConfigError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)

    @property
    def num_subjects(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]

    @property
    def scale(self) -> float:
        """The factor ``alpha / r`` that multiplies ``B A``."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW for each subject: ``(alpha / r) · B A``, shape ``(N, d_out, d_in)``."""
        return self.scale * torch.bmm(self.B, self.A)

    def with_unit_scale(self) -> LoRALayer:
        """The same ΔW with ``alpha = r`` (scale 1), the scale folded into B."""
        return LoRALayer(self.A, self.B * self.scale, float(self.rank))


def frobenius_sq(layer: LoRALayer) -> torch.Tensor:
    """``‖ΔW‖²_F`` per subject, shape ``(N,)``, without forming ΔW.

    ``‖s·BA‖²_F = s² · tr(Aᵀ Bᵀ B A) = s² · Σ_ij (BᵀB)_ij (A Aᵀ)_ij`` — two ``(r, r)`` Gram matrices, so the
    cost is ``O(r² (d_in + d_out))`` instead of ``O(d_in d_out r)``. This is the output regularization of
    Shrestha et al. (arXiv 2511.03156), summed over layers by :meth:`LoRAWeights.frobenius_sq`.
    """
    gram_B = torch.bmm(layer.B.transpose(1, 2), layer.B)  # (N, r, r)
    gram_A = torch.bmm(layer.A, layer.A.transpose(1, 2))  # (N, r, r)
    return layer.scale**2 * (gram_B * gram_A).sum(dim=(1, 2))


class LoRAWeights(Mapping[str, LoRALayer]):
    """LoRA factors for N subjects over a set of target modules, keyed by module name (relative to one model).

    Immutable: every operation returns a new object. All layers share N, device and dtype; ranks and alphas may
    differ per layer.
    """

    def __init__(self, layers: Mapping[str, LoRALayer]):
        layers = dict(layers)
        if not layers:
            raise ConfigError("LoRAWeights needs at least one target module")
        first_name, first = next(iter(layers.items()))
        for name, layer in layers.items():
            if not isinstance(layer, LoRALayer):
                raise ConfigError(f"LoRAWeights[{name!r}] must be a LoRALayer, got {type(layer).__name__}")
            if layer.num_subjects != first.num_subjects:
                raise ConfigError(
                    f"LoRA layers disagree on the number of subjects: {first_name!r} has {first.num_subjects}, "
                    f"{name!r} has {layer.num_subjects}"
                )
            if layer.A.dtype != first.A.dtype or layer.A.device != first.A.device:
                raise ConfigError(
                    f"LoRA layers must share dtype and device: {first_name!r} is {first.A.dtype} on {first.A.device}, "
                    f"{name!r} is {layer.A.dtype} on {layer.A.device}"
                )
        self._layers = layers

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_factors(
        cls, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float]
    ) -> LoRAWeights:
        """Build from dicts of ``A (N, r, d_in)`` and ``B (N, d_out, r)``; ``alpha`` one number or one per name."""
        if set(A) != set(B):
            raise ConfigError(f"A and B name different modules: {sorted(set(A) ^ set(B))[:3]}")
        alphas = alpha if isinstance(alpha, Mapping) else {name: alpha for name in A}
        return cls({name: LoRALayer(A[name], B[name], alphas[name]) for name in A})

    @classmethod
    def random(
        cls,
        shapes: Mapping[str, tuple[int, int]],
        rank: int,
        num_subjects: int = 1,
        alpha: float | None = None,
        std: float = 0.02,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LoRAWeights:
        """Random factors for ``shapes`` (name → ``(d_in, d_out)``); both A and B non-zero. For tests/benchmarks."""
        layers = {}
        for name, (d_in, d_out) in shapes.items():
            A = torch.randn(num_subjects, rank, d_in, generator=generator, dtype=dtype) * std
            B = torch.randn(num_subjects, d_out, rank, generator=generator, dtype=dtype) * std
            layers[name] = LoRALayer(A, B, float(alpha if alpha is not None else rank))
        return cls(layers)

    # -- mapping ----------------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> LoRALayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        ranks = sorted({layer.rank for layer in self._layers.values()})
        return (
            f"LoRAWeights({len(self)} modules, N={self.num_subjects}, rank={ranks if len(ranks) > 1 else ranks[0]}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def _first(self) -> LoRALayer:
        return next(iter(self._layers.values()))

    @property
    def num_subjects(self) -> int:
        return self._first.num_subjects

    @property
    def dtype(self) -> torch.dtype:
        return self._first.A.dtype

    @property
    def device(self) -> torch.device:
        return self._first.A.device

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self._layers.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """name → ``(d_in, d_out)`` of each target module."""
        return {name: (layer.d_in, layer.d_out) for name, layer in self._layers.items()}

    # -- elementwise transforms -------------------------------------------------------------------------------

    def map(self, fn) -> LoRAWeights:
        """Apply ``fn(layer) -> LoRALayer`` to every layer."""
        return LoRAWeights({name: fn(layer) for name, layer in self._layers.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoRAWeights:
        return self.map(lambda l: LoRALayer(l.A.to(device=device, dtype=dtype), l.B.to(device=device, dtype=dtype), l.alpha))

    def detach(self) -> LoRAWeights:
        return self.map(lambda l: LoRALayer(l.A.detach(), l.B.detach(), l.alpha))

    def scaled(self, s: float) -> LoRAWeights:
        """ΔW → s · ΔW (the "LoRA scale" of diffusers and A1111), by scaling B."""
        return self.map(lambda l: LoRALayer(l.A, l.B * s, l.alpha))

    def select(self, index: int | Sequence[int] | torch.Tensor) -> LoRAWeights:
        """Keep subjects ``index`` (an int keeps one subject, N = 1)."""
        if isinstance(index, int):
            if not -self.num_subjects <= index < self.num_subjects:
                raise ConfigError(f"subject index {index} is out of range for N={self.num_subjects}")
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self.map(lambda l: LoRALayer(l.A[idx], l.B[idx], l.alpha))

    def with_unit_scale(self) -> LoRAWeights:
        """The same ΔW with alpha = rank in every layer (the diffusers/PEFT file convention)."""
        return self.map(LoRALayer.with_unit_scale)

    def deltas(self) -> dict[str, torch.Tensor]:
        """name → ΔW ``(N, d_out, d_in)``. Forms the full matrices: for tests, merging and small models."""
        return {name: layer.delta() for name, layer in self._layers.items()}

    def frobenius_sq(self) -> torch.Tensor:
        """``Σ_l ‖ΔW_l‖²_F`` per subject, shape ``(N,)`` (the e2e output regularization)."""
        return torch.stack([frobenius_sq(layer) for layer in self._layers.values()]).sum(dim=0)

    # -- exact combinations in ΔW space ----------------------------------------------------------------------

    def mean(self) -> LoRAWeights:
        """The mean ΔW over the N subjects, as one subject of rank ``N · r`` (exact)."""
        n = self.num_subjects
        return combine([self.select(i) for i in range(n)], [1.0 / n] * n)

    def lerp(self, other: LoRAWeights, t: float) -> LoRAWeights:
        """``(1 - t) · ΔW_self + t · ΔW_other`` (exact; rank is the sum of both)."""
        return combine([self, other], [1.0 - t, t])

    def concat(self, other: LoRAWeights) -> LoRAWeights:
        """``ΔW_self + ΔW_other`` as one LoRA of rank ``r_self + r_other`` (exact)."""
        return combine([self, other], [1.0, 1.0])


def _same_targets(weights: Sequence[LoRAWeights]) -> list[str]:
    """The module names of ``weights[0]``, after checking every LoRA names the same modules."""
    names = list(weights[0])
    for i, w in enumerate(weights[1:], start=1):
        if set(w) != set(names):
            missing = sorted(set(names) ^ set(w))
            raise ConfigError(f"LoRA {i} targets other modules than LoRA 0 (first difference: {missing[0]!r})")
    return names


def combine(weights: Sequence[LoRAWeights], coeffs: Sequence[float]) -> LoRAWeights:
    """``Σ_i c_i · ΔW_i`` as one LoRA, exactly, by concatenating factors along the rank axis.

    With ``s_i = alpha_i / r_i``: ``Σ_i c_i s_i B_i A_i = [c_1 s_1 B_1 | … ] · [A_1; …]``, returned with
    ``alpha = Σ r_i`` (scale 1). All inputs must name the same modules and have the same N.
    """
    if len(weights) != len(coeffs) or not weights:
        raise ConfigError(f"combine needs as many coefficients as LoRAs, got {len(weights)} LoRAs and {len(coeffs)} coefficients")
    names = _same_targets(weights)
    for i, w in enumerate(weights[1:], start=1):
        if w.num_subjects != weights[0].num_subjects:
            raise ConfigError(f"LoRA {i} has N={w.num_subjects}, LoRA 0 has N={weights[0].num_subjects}")
    layers = {}
    for name in names:
        parts = [w[name] for w in weights]
        A = torch.cat([p.A for p in parts], dim=1)  # (N, Σr, d_in)
        B = torch.cat([p.B * (c * p.scale) for p, c in zip(parts, coeffs)], dim=2)  # (N, d_out, Σr)
        layers[name] = LoRALayer(A, B, float(A.shape[1]))
    return LoRAWeights(layers)


def stack(weights: Sequence[LoRAWeights]) -> LoRAWeights:
    """The subjects of several LoRAs as one: ``N = Σ N_i`` in order (e.g. per-subject fine-tuned LoRAs batched for
    per-sample injection). All must name the same modules with the same rank per module; each one's ``alpha / r`` is
    folded into its ``B`` (scale 1), so LoRAs with other alphas stack exactly."""
    if not weights:
        raise ConfigError("stack needs at least one LoRA")
    names = _same_targets(weights)
    for i, w in enumerate(weights[1:], start=1):
        for name in names:
            if w[name].rank != weights[0][name].rank:
                raise ConfigError(f"LoRA {i} has rank {w[name].rank} on {name!r}, LoRA 0 has rank {weights[0][name].rank}")
    layers = {}
    for name in names:
        parts = [w[name].with_unit_scale() for w in weights]
        layers[name] = LoRALayer(torch.cat([p.A for p in parts]), torch.cat([p.B for p in parts]), float(parts[0].rank))
    return LoRAWeights(layers)
