"""Guidance rules: how the model predictions of one sampling step are combined. Pure functions on tensors.

They act on any prediction that is affine in the noise (ε, v or x0 prediction): each rule is an affine
combination whose coefficients sum to 1, so it means the same thing in every parameterization.
"""

from __future__ import annotations

import math

import torch

from hyperbooth.errors import ConfigError

#: The guidance rules of :func:`hyperbooth.generate.generate`.
GUIDANCE = ("cfg", "hm-cfg")
#: CFG's scale (the base model, and the personalized model under ``"cfg"``).
DEFAULT_GUIDANCE_SCALE = 3.0
#: HM-CFG weights used when none are given (``generate``, ``demo``, ``eval-personalization``), chosen by the sweep in
#: the README (``hyperbooth world eval-personalization --w-base … --w-pers …``, 50 held-out world identities): with
#: the shipped e2e hypernetwork (2, 2) is above personalized CFG (scale 3) in subject and in prompt fidelity at once.
DEFAULT_W_BASE = 2.0
DEFAULT_W_PERS = 2.0
#: HM-CFG's personalized branch runs at every step by default (see :func:`pers_active`).
DEFAULT_PERS_INTERVAL = (0.0, 1.0)


def cfg(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022):

        ε̃ = ε(∅) + w · (ε(c) − ε(∅))

    ``w = 1`` returns the conditional prediction; ``w = 0`` the unconditional one.
    """
    return pred_uncond + scale * (pred_cond - pred_uncond)


def hm_cfg(
    base_uncond: torch.Tensor,
    base_cond: torch.Tensor,
    pers_cond: torch.Tensor,
    w_base: float,
    w_pers: float,
) -> torch.Tensor:
    """Hybrid-Model CFG (Shrestha et al., "Finetuning-Free Personalization of Text to Image Generation via
    Hypernetworks", arXiv 2511.03156), with ε_B the frozen base model and ε_P the personalized one:

        ε̃ = ε_B(∅) + w_base · (ε_B(c) − ε_B(∅)) + w_pers · (ε_P(c) − ε_B(∅))

    The base model's text direction carries prompt compliance; the personalized model's direction carries the
    subject. ``w_pers = 0`` is base-model CFG with scale ``w_base``; ``w_base = 0`` is CFG of the personalized model
    against the base model's unconditional prediction.
    """
    return base_uncond + w_base * (base_cond - base_uncond) + w_pers * (pers_cond - base_uncond)


def resolve_guidance(guidance: str | None, has_lora: bool) -> str:
    """The guidance rule to run: ``None`` means HM-CFG with a LoRA and CFG without; an unknown name, or HM-CFG asked
    for without a LoRA (it needs a personalized branch), is a :class:`ConfigError`, never replaced silently."""
    if guidance is None:
        return "hm-cfg" if has_lora else "cfg"
    if guidance not in GUIDANCE:
        raise ConfigError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE)}")
    if guidance == "hm-cfg" and not has_lora:
        raise ConfigError("guidance 'hm-cfg' needs a personalized model (a LoRA or reference images); use 'cfg' for the base model")
    return guidance


def check_interval(interval, name: str = "pers_interval") -> tuple[float, float]:
    """``(lo, hi)`` with ``0 ≤ lo ≤ hi ≤ 1``, or a :class:`ConfigError` naming the value."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={interval!r} must be two numbers lo,hi") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
        raise ConfigError(f"{name}={interval!r} must satisfy 0 <= lo <= hi <= 1")
    return lo, hi


def parse_interval(text: str, option: str = "--pers-interval") -> tuple[float, float]:
    """``"LO,HI"`` from a command line → ``(lo, hi)``; the error names the option and the text."""
    try:
        return check_interval([float(v) for v in str(text).split(",")])
    except (ValueError, ConfigError):
        raise ConfigError(f"{option} {text!r} must be LO,HI with 0 <= LO <= HI <= 1") from None


def pers_active(timestep: float, num_train_timesteps: int, interval: tuple[float, float] = DEFAULT_PERS_INTERVAL) -> bool:
    """HM-CFG's timestep schedule: whether the personalized branch runs at ``timestep``.

    With ``τ = t / T`` (the scheduler's timestep over its training timesteps: near 1 at the start of sampling, where
    the sample is noise, near 0 at its end; the exact values depend on the scheduler's ``timestep_spacing``, e.g.
    "leading" spacing ends at t = 0), the branch runs for ``lo ≤ τ ≤ hi`` and ``w_pers`` is 0 elsewhere, where the step is base-model CFG with ``w_base`` on the base
    rows alone (2N rows instead of 3N). A guidance interval in the sense of Kynkäänniemi et al., "Applying Guidance
    in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models" (NeurIPS 2024), applied to
    the personalized term: e.g. ``(0.5, 1)`` lets the subject shape the coarse, early steps and leaves the late
    steps to the base model. The default ``(0, 1)`` is every step.
    """
    lo, hi = interval
    tau = float(timestep) / float(num_train_timesteps)
    return lo <= tau <= hi
