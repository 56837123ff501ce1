"""Full DreamBooth: every UNet weight fine-tuned per subject (Ruiz et al., "DreamBooth", 2023) — the seeds' baseline
and the ceiling above DreamBooth-LoRA.

The recipe of diffusers' ``examples/dreambooth/train_dreambooth.py`` (its defaults: AdamW, lr 5e-6, constant, batch 1,
400 steps, text encoder frozen, optional prior preservation), through the same loop as DreamBooth-LoRA
(:func:`hyperbooth.methods.dreambooth_lora.fit`): only the trained parameters differ.

A full fine-tune is not a LoRA, so it is not a :class:`~hyperbooth.methods.base.Personalizer` (whose subjects are
LoRAs generated side by side in one batch): :func:`full_finetune` changes the backbone's UNet inside a ``with``
block and restores every weight on exit, and a caller generates inside it::

    with full_finetune(base, refs, "toy", FullFinetuneConfig(steps=400)) as stats:
        images = generate(base, ["a sks toy in the snow"], None, guidance="cfg")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hyperbooth.backbones.base import Backbone
from hyperbooth.errors import ConfigError
from hyperbooth.methods.dreambooth_lora import FinetuneConfig, FinetuneStats, _check_inputs, fit

log = logging.getLogger(__name__)


@dataclass
class FullFinetuneConfig(FinetuneConfig):
    """:class:`~hyperbooth.methods.dreambooth_lora.FinetuneConfig` with diffusers' full-DreamBooth defaults;
    ``rank`` and ``targets`` are not used (every UNet weight trains)."""

    steps: int = 400
    lr: float = 5e-6
    weight_decay: float = 1e-2


@contextmanager
def full_finetune(
    base: Backbone,
    images: torch.Tensor,
    class_name: str,
    cfg: FullFinetuneConfig | None = None,
    callback: Callable[[int], None] | None = None,
    progress: bool = False,
) -> Iterator[FinetuneStats]:
    """Fine-tune every weight of ``base``'s UNet on ``images (k, 3, H, W)`` of one subject; inside the block the
    backbone is the personalized model, on exit (also on an error) every weight and ``requires_grad`` flag is
    restored. ``callback(step)`` runs at step 0 and after every step with the UNet at that step (e.g. to sample a
    learning curve); its time is not counted in ``stats.seconds``."""
    cfg = cfg or FullFinetuneConfig()
    cfg.validate()
    _check_inputs(base, images, class_name)
    unet = base.unet
    if unet.dtype != torch.float32:
        raise ConfigError(f"full DreamBooth trains the UNet's own weights, which are {unet.dtype}: an update at lr {cfg.lr:g} is lost "
                          "to half-precision rounding; load the backbone in float32")
    original = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    t_start = time.perf_counter()
    outside = 0.0

    def call(step: int) -> None:
        nonlocal outside
        if callback is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                callback(step)
            outside += time.perf_counter() - t0

    try:
        unet.requires_grad_(True)
        params = [p for p in unet.parameters()]
        with torch.enable_grad():
            stats = fit(base, images, class_name, cfg, params, base.denoise, call, torch.Generator().manual_seed(cfg.seed), progress)
        unet.requires_grad_(False)
        stats.seconds = time.perf_counter() - t_start - outside
        log.info("full DreamBooth: %d steps in %.1f s", cfg.steps, stats.seconds)
        yield stats
    finally:
        unet.load_state_dict(original)
        for name, p in unet.named_parameters():
            p.requires_grad_(requires_grad[name])
