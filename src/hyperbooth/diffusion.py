"""The diffusion training objective as pure functions, over a diffusers noise schedule.

Forward process (Ho et al., "Denoising Diffusion Probabilistic Models", 2020):
``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε``. The network predicts, by ``prediction_type``:

- ``"epsilon"``: ε;
- ``"v_prediction"``: ``v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0`` (Salimans & Ho, "Progressive Distillation", 2022);
- ``"sample"``: x_0.

Min-SNR-γ loss weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023)
balances timesteps; ``gamma = 0`` turns it off (plain MSE on the target).
"""

from __future__ import annotations

import torch

from hyperbooth.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``ᾱ_t / (1 − ᾱ_t)`` at integer timesteps ``t``, shape ``(B,)``."""
    a = alphas_cumprod.to(t.device)[t]
    return a / (1.0 - a)


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output for ``x_t`` made from ``x0`` and ``noise`` at ``t``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise - (1.0 - a).sqrt() * x0
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def loss_weights(prediction_type: str, alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-γ weights, shape ``(B,)``, for an MSE on the given prediction target.

    In ε-units the weight is ``min(SNR, γ) / SNR``; an MSE on v equals ``(SNR + 1)`` × the ε-MSE, and one on x0
    equals ``SNR`` × it, so the weights are divided accordingly. ``gamma <= 0`` gives ones.
    """
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    s = snr(alphas_cumprod, t)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``E_b [ w_b · mean over pixels (pred − target)² ]``, a scalar."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
