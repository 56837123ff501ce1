"""Sampling with personalized LoRAs on any :class:`~hyperbooth.backbones.base.Backbone`: CFG of the personalized
model, or Hybrid-Model CFG, each step in ONE denoiser call.

Batch layout of a step for N prompts (per-sample LoRA rows; -1 = the frozen base model):

- ``"cfg"``:    ``[P(∅) × N ; P(c) × N]``                 rows ``[0..N-1, 0..N-1]`` (merged weights for one subject)
- ``"hm-cfg"``: ``[B(∅) × N ; B(c) × N ; P(c) × N]``      rows ``[-1 × 2N, 0..N-1]``

and the rule of :mod:`hyperbooth.guidance` combines the branches. A LoRA of one subject serves every prompt. A
text-encoder LoRA (SD backbones) conditions the personalized rows only: ``P(∅)``, ``P(c)`` under CFG, ``P(c)`` under
HM-CFG. The sampler runs in the backbone's space (pixels for the world, VAE latents for SD) and decodes at the end.

    images = generate(backbone, ["a sks toy in the snow"], weights, guidance="hm-cfg", steps=25, seed=0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from hyperbooth.backbones.base import Backbone, ComponentLoRA, Conditioning, as_components
from hyperbooth.errors import ConfigError
from hyperbooth.guidance import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_PERS_INTERVAL,
    DEFAULT_W_BASE,
    DEFAULT_W_PERS,
    cfg,
    check_interval,
    hm_cfg,
    pers_active,
    resolve_guidance,
)
from hyperbooth.lora.inject import LoRAInjector
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, denoise, make_scheduler

log = logging.getLogger(__name__)


def check_finite(name: str, value: float) -> float:
    """``value`` as a float, or a :class:`ConfigError` naming ``name`` when it is not a finite number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str],
    weights: ComponentLoRA | None = None,
    guidance: str | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    w_base: float = DEFAULT_W_BASE,
    w_pers: float = DEFAULT_W_PERS,
    pers_interval: tuple[float, float] = DEFAULT_PERS_INTERVAL,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    scheduler: str = DEFAULT_SCHEDULER,
    lora_scale: float = 1.0,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One image per prompt; ``(N, 3, H, W)`` float32 on the CPU in [-1, 1].

    ``weights``: a UNet LoRA or LoRAs by component (``{"unet": …, "text_encoder": …}``), one subject for every prompt
    or N subjects (prompt ``i`` with subject ``i``); ``None`` samples the base model. ``guidance``: ``"cfg"`` or
    ``"hm-cfg"``; ``None`` is HM-CFG with a LoRA and CFG without (:func:`~hyperbooth.guidance.resolve_guidance`;
    HM-CFG asked for without a LoRA is an error, never replaced). ``guidance_scale`` is CFG's scale;
    ``w_base``/``w_pers`` are HM-CFG's, and ``pers_interval`` its timestep schedule
    (:func:`~hyperbooth.guidance.pers_active`: outside it a step runs the base rows alone, with ``w_pers = 0``). The
    denoiser runs on its own device and dtype; the initial noise is drawn on the CPU from ``seed``, so one seed gives
    one image. ``callback(i, t, x_t)`` runs after every step; ``progress`` shows a bar.
    """
    parts = as_components(weights, backbone.denoiser)
    guidance = resolve_guidance(guidance, has_lora=bool(parts))
    for name, value in (("guidance_scale", guidance_scale), ("w_base", w_base), ("w_pers", w_pers), ("lora_scale", lora_scale)):
        check_finite(name, value)
    pers_interval = check_interval(pers_interval)
    if pers_interval != DEFAULT_PERS_INTERVAL and (guidance != "hm-cfg" or not parts):
        log.warning("pers_interval=%s only applies to HM-CFG with a LoRA; ignored for guidance=%r", pers_interval, guidance)
    n = len(prompts)
    if n == 0:
        raise ConfigError("no prompts given")
    unknown = set(parts) - set(backbone.components)
    if unknown:
        raise ConfigError(f"the {backbone.name} backbone has no component {sorted(unknown)[0]!r} for the LoRA (it has {', '.join(backbone.components)})")
    k = next(iter(parts.values())).num_subjects if parts else 0
    for comp, w in parts.items():
        if w.num_subjects not in (1, n) or w.num_subjects != k:
            raise ConfigError(f"{n} prompts but the {comp} LoRA holds {w.num_subjects} subjects (give one subject or one per prompt, the same for every component)")
    unet_lora = parts.get(backbone.denoiser)
    text_loras = {c: (w if lora_scale == 1.0 else w.scaled(lora_scale)) for c, w in parts.items() if c != backbone.denoiser}  # the UNet's is scaled by its injector
    # one text encoder's LoRA as itself (every backbone's encode_prompts takes it), several by component (SDXL's two)
    text_lora = text_loras.get("text_encoder") if set(text_loras) <= {"text_encoder"} else text_loras
    if not parts:
        branches, rows, mode = 2, None, None
    elif guidance == "cfg":
        branches, rows, mode = 2, None, ("merged" if k == 1 else "per_sample")
    else:
        branches, mode = 3, "per_sample"
        subject = torch.zeros(n, dtype=torch.long) if k == 1 else torch.arange(n)
        rows = torch.cat([torch.full((2 * n,), -1), subject])  # (3N,)
    cond = _conditioning(backbone, list(prompts), branches, text_lora if parts else None)  # (branches·N, …)
    unet = backbone.unet
    dtype = unet.dtype

    sampler = make_scheduler(scheduler, backbone.scheduler)
    num_train_timesteps = sampler.config.num_train_timesteps
    injector = LoRAInjector(unet)
    scheduled = branches == 3 and pers_interval != DEFAULT_PERS_INTERVAL  # else no per-step check (nor device sync)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # HM-CFG outside its timestep interval: w_pers = 0, so only the 2N base rows run, with the LoRA switched off
        base_only = scheduled and not pers_active(t[0], num_train_timesteps, pers_interval)
        b = 2 if base_only else branches
        x_in = x_t.to(dtype).repeat(b, 1, 1, 1)  # (b·N, C, H, W) in the denoiser's dtype
        with injector.disabled() if base_only else nullcontext():
            pred = backbone.denoise(x_in, t.repeat(b), cond.take(b * n))
        parts_ = pred.to(x_t.dtype).chunk(b)
        if base_only:
            return cfg(parts_[0], parts_[1], w_base)
        if branches == 2:
            return cfg(parts_[0], parts_[1], guidance_scale)
        return hm_cfg(parts_[0], parts_[1], parts_[2], w_base, w_pers)

    shape = (n, *backbone.sample_shape)
    generator = torch.Generator().manual_seed(seed)
    lora = nullcontext() if unet_lora is None else injector.apply(unet_lora, mode=mode, rows=rows, scale=lora_scale)
    with lora:  # x_t stays float32; the denoiser runs in its own dtype
        x = denoise(model_fn, sampler, shape, steps, generator=generator, device=unet.device, callback=callback, progress=progress)
    return backbone.to_images(x).float().clamp(-1, 1).cpu()


def _conditioning(backbone: Backbone, prompts: list[str], branches: int, text_lora) -> Conditioning:
    """Rows ``[∅ × N ; c × N]`` (CFG) or ``[∅ × N ; c × N ; c × N]`` (HM-CFG); a text-encoder LoRA conditions the
    personalized rows (all of CFG's, the last N of HM-CFG's)."""
    n = len(prompts)
    texts = [""] * n + prompts * (branches - 1)
    if text_lora is None:
        return backbone.encode_prompts(texts)
    if branches == 2:
        return backbone.encode_prompts(texts, lora=text_lora)
    return Conditioning.cat([backbone.encode_prompts(texts[: 2 * n]), backbone.encode_prompts(prompts, lora=text_lora)])
