"""Guidance rules: how the model predictions of one sampling step are combined. Pure functions on tensors.

They act on any prediction that is affine in the noise (ε, v or x0 prediction): each rule is an affine
combination whose coefficients sum to 1, so it means the same thing in every parameterization.
"""

from __future__ import annotations

import torch


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
