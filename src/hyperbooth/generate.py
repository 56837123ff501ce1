"""Generation with personalized LoRAs: CFG of the personalized model, or Hybrid-Model CFG, each step in ONE UNet call.

Batch layout of a step for N subjects (per-sample LoRA rows; -1 = the frozen base model):

- ``"cfg"``:    ``[P(∅) × N ; P(c) × N]``                 rows ``[0..N-1, 0..N-1]`` (merged weights when N = 1)
- ``"hm-cfg"``: ``[B(∅) × N ; B(c) × N ; P(c) × N]``      rows ``[-1 × 2N, 0..N-1]``

and the rule of :mod:`hyperbooth.guidance` combines the branches.
"""

from __future__ import annotations

import torch

from hyperbooth.errors import ConfigError
from hyperbooth.guidance import cfg, hm_cfg
from hyperbooth.lora.inject import LoRAInjector
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.sampling import denoise, make_scheduler

GUIDANCE = ("cfg", "hm-cfg")


@torch.no_grad()
def generate(
    base,
    prompts: list[str],
    weights: LoRAWeights | None = None,
    guidance: str = "hm-cfg",
    guidance_scale: float = 3.0,
    w_base: float = 3.0,
    w_pers: float = 1.0,
    steps: int = 25,
    seed: int = 0,
    scheduler: str = "ddim",
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """One image per prompt (prompt ``i`` personalized with subject ``i``); ``(N, 3, H, W)`` in [-1, 1].

    ``weights=None`` samples the base model with CFG. ``guidance_scale`` is CFG's scale; ``w_base``/``w_pers``
    are HM-CFG's.
    """
    if guidance not in GUIDANCE:
        raise ConfigError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE)}")
    n = len(prompts)
    unet = base.unet
    if weights is not None and weights.num_subjects != n:
        raise ConfigError(f"{n} prompts but the LoRA holds {weights.num_subjects} subjects")
    injector = LoRAInjector(unet)
    if weights is None:
        branches, rows, mode = 2, None, None
    elif guidance == "cfg":
        branches, rows, mode = 2, None, ("merged" if n == 1 else "per_sample")
    else:
        branches, mode = 3, "per_sample"
        rows = torch.cat([torch.full((2 * n,), -1), torch.arange(n)])
    states, mask = base.encode(["" for _ in prompts] + list(prompts) * (branches - 1))

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred = unet(x_t.repeat(branches, 1, 1, 1), t.repeat(branches), encoder_hidden_states=states, encoder_attention_mask=mask).sample
        parts = pred.chunk(branches)
        if branches == 2:
            return cfg(parts[0], parts[1], guidance_scale)
        return hm_cfg(parts[0], parts[1], parts[2], w_base, w_pers)

    sampler = make_scheduler(scheduler, base.scheduler)
    shape = (n, unet.config.in_channels, base.resolution, base.resolution)
    generator = torch.Generator().manual_seed(seed)
    if weights is None:
        return denoise(model_fn, sampler, shape, steps, generator=generator, device=unet.device).clamp(-1, 1)
    with injector.apply(weights, mode=mode, rows=rows, scale=lora_scale):
        return denoise(model_fn, sampler, shape, steps, generator=generator, device=unet.device).clamp(-1, 1)
