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

**Flow matching** (rectified flow; Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", 2024, the SD3 paper): a backbone whose scheduler is a ``FlowMatchEulerDiscreteScheduler`` (SD3) is
trained on the straight path ``x_t = (1 − σ) x_0 + σ ε`` with the velocity target ``v = ε − x_0`` (prediction type
``"flow"``), where the denoiser's timestep is ``t = σ · T`` (T = ``num_train_timesteps``, 1000). Every function here
dispatches on the schedule's class: :func:`training_scheduler` keeps the flow-matching class,
:func:`training_timesteps` maps the trainers' uniform draw ``i ∈ {0 … T−1}`` to ``t = σ_i · T`` on the schedule's own
(shifted) sigmas, as diffusers' SD3 trainers do with ``weighting_scheme="none"``, and :func:`loss_weights` gives
Min-SNR-γ with ``SNR = ((1 − σ) / σ)²``.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from hyperbooth.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: the prediction type of a flow-matching backbone: the velocity ``v = ε − x_0``
FLOW = "flow"
#: γ of Min-SNR-γ weighting, the paper's recommended value (0 turns the weighting off)
DEFAULT_MIN_SNR_GAMMA = 5.0


def is_flow_matching(scheduler_or_config) -> bool:
    """Whether a scheduler (or its config) is a flow-matching one (``FlowMatch…Scheduler``, SD3's and Flux's): by its
    class name; a config built in memory carries none, and is one when it has a ``shift`` and no beta schedule."""
    if hasattr(scheduler_or_config, "config"):
        return type(scheduler_or_config).__name__.startswith("FlowMatch")
    config = dict(scheduler_or_config)
    if "_class_name" in config:
        return str(config["_class_name"]).startswith("FlowMatch")
    return "shift" in config and "beta_schedule" not in config


def _sigmas(scheduler: FlowMatchEulerDiscreteScheduler, t: torch.Tensor) -> torch.Tensor:
    """``σ = t / T`` of flow-matching timesteps ``t (B,)``, float32."""
    return t.float() / float(scheduler.config.num_train_timesteps)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` → ``(B, 1, …)`` broadcasting over ``like (B, …)``, in its dtype and on its device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def training_scheduler(config) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training noise schedule of a model whose (any diffusers) scheduler has ``config``: a
    ``FlowMatchEulerDiscreteScheduler`` for a flow-matching config, a ``DDPMScheduler`` for any other."""
    if is_flow_matching(config):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler = DDPMScheduler.from_config(config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {scheduler.config.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return scheduler


def check_min_snr(scheduler, gamma: float, key: str = "min_snr_gamma") -> None:
    """Min-SNR-γ is a weighting for DDPM-type schedules; on a flow-matching one its ε-equivalent weight
    ``min(SNR, γ) · σ²`` all but switches off the noisiest steps under SD3's shifted schedule (0.011 on average for
    σ > 0.8), so a flow-matching run must ask for it explicitly off (the SD3 preset does) rather than get it by default."""
    if gamma > 0 and isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ConfigError(f"{key}={gamma:g}: Min-SNR weighting is for DDPM-type schedules; this backbone trains by flow matching, "
                          f"which hyperbooth trains unweighted: set {key}=0 (as configs/e2e_sd3.yaml does)")


def training_timesteps(scheduler, index: torch.Tensor) -> torch.Tensor:
    """The denoiser's timesteps ``t (B,)`` for the trainers' uniform draws ``index (B,)`` in ``{0 … T−1}``: the index
    itself for a DDPM-type schedule; ``σ_i · T`` (float) for flow matching, ``σ_i`` the schedule's own training
    sigmas (shifted by its ``shift``; i = 0 is pure noise)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler.timesteps[index.cpu()].to(index.device)
    return index


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` for ``x0, noise (B, …)`` at integer timesteps ``t (B,)``; for flow
    matching ``x_t = (1 − σ) x0 + σ ε`` with ``σ = t / T``."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = _expand(_sigmas(scheduler, t), x0)
        return (1 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, t.to(x0.device))


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output for ``x_t`` made from ``x0`` and ``noise`` at ``t`` (by the schedule's
    ``prediction_type``); for flow matching the velocity ``ε − x0``."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return noise - x0
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t.to(x0.device))
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def forward_process(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)``: the noised sample and what the network should predict from it."""
    return add_noise(scheduler, x0, noise, t), training_target(scheduler, x0, noise, t)


def loss_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-γ weights, shape ``(B,)``, for an MSE on the schedule's prediction target.

    In ε-units the weight is ``min(SNR, γ) / SNR``; an MSE on v equals ``(SNR + 1)`` × the ε-MSE, and one on x0
    equals ``SNR`` × it, so the weights are divided accordingly. ``gamma <= 0`` gives ones.

    Flow matching: ``SNR = ((1 − σ) / σ)²``, and ``ε − ε̂ = (1 − σ)(v − v̂)``, so an MSE on v equals ``1 / (1 − σ)²``
    × the ε-MSE and the weight is ``min(SNR, γ) / SNR · (1 − σ)² = min(SNR, γ) · σ²``.
    """
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = _sigmas(scheduler, t).clamp(min=1e-6)  # σ = 0 never occurs in training; no division by zero
        snr = ((1 - sigma) / sigma) ** 2
        return torch.clamp(snr, max=gamma) * sigma**2
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
