"""The diffusion training objective, on diffusers' own pieces: one place for the forward noising, the prediction
target and the Min-SNR loss weights that every trainer (``train-base``, ``train``, DreamBooth-LoRA) uses.

Forward process (Ho et al., "Denoising Diffusion Probabilistic Models", 2020), ``scheduler.add_noise``:
``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε``. The network predicts, by ``prediction_type``:

- ``"epsilon"``: ε;
- ``"v_prediction"``: ``v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0`` (Salimans & Ho, "Progressive Distillation", 2022),
  ``scheduler.get_velocity``;
- ``"sample"``: x_0.

Min-SNR-γ loss weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023)
balances timesteps, with ``SNR_t = ᾱ_t / (1 − ᾱ_t)`` from ``diffusers.training_utils.compute_snr``; ``gamma = 0``
turns it off (plain MSE on the target).

The schedule is a :class:`~diffusers.DDPMScheduler` built from the backbone's scheduler config
(:func:`training_scheduler`): a sampler's config (DDIM, PNDM, …) carries the same betas, and the DDPM class holds
``add_noise`` and ``get_velocity`` for every one of them.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from hyperbooth.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: γ of Min-SNR-γ weighting, the paper's recommended value (0 turns the weighting off)
DEFAULT_MIN_SNR_GAMMA = 5.0


def training_scheduler(config) -> DDPMScheduler:
    """The training noise schedule of a model whose (any diffusers) scheduler has ``config``."""
    scheduler = DDPMScheduler.from_config(config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {scheduler.config.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return scheduler


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` for ``x0, noise (B, …)`` at integer timesteps ``t (B,)``."""
    return scheduler.add_noise(x0, noise, t.to(x0.device))


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output for ``x_t`` made from ``x0`` and ``noise`` at ``t`` (by the schedule's
    ``prediction_type``)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t.to(x0.device))
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def forward_process(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)``: the noised sample and what the network should predict from it."""
    return add_noise(scheduler, x0, noise, t), training_target(scheduler, x0, noise, t)


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-γ weights, shape ``(B,)``, for an MSE on the schedule's prediction target.

    In ε-units the weight is ``min(SNR, γ) / SNR``; an MSE on v equals ``(SNR + 1)`` × the ε-MSE, and one on x0
    equals ``SNR`` × it, so the weights are divided accordingly. ``gamma <= 0`` gives ones.
    """
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    s = compute_snr(scheduler, t)  # (B,) float32
    clipped = torch.clamp(s, max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``E_b [ w_b · mean over pixels (pred − target)² ]``, a scalar."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
