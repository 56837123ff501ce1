"""The optimization recipe every trainer shares: its config, AdamW, and the one learning-rate schedule (linear
warm-up, then a cosine decay to a floor), used by ``train-base``, ``train`` and the world's oracle and encoder
pre-training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hyperbooth.errors import ConfigError


@dataclass
class OptimConfig:
    batch_size: int = 32  # the global batch (all processes together)
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_steps: int = 5000
    min_lr_ratio: float = 0.1  # the cosine's floor, as a fraction of lr
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 turns EMA off

    def validate(self) -> None:
        for key in ("batch_size", "max_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip} must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay={self.ema_decay} must be in [0, 1) (0 turns EMA off)")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during the warm-up, then
    ``min_ratio + (1 − min_ratio) · ½ (1 + cos(π · p))`` with ``p = min(step − warmup, T) / T``, ``T = total − warmup``.

    Written here rather than taken from ``diffusers.optimization.get_cosine_schedule_with_warmup`` (or
    ``get_scheduler("cosine")``), because that one has another shape: it decays to 0 with no floor and warms up
    from lr 0 at step 0 (``step / warmup``). The shipped world recipes (base model, e2e) were trained with this
    shape (the first step already moves; a floor of 0.1; the same multipliers to within 1 ulp), and with
    ``warmup = 0, min_ratio = 0`` it is, bit for bit, the plain cosine ``½ (1 + cos(π · min(step, total) / total))``
    the oracle and encoder pre-training were trained with — so one function keeps all four schedules' shapes.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`warmup_cosine`; step it once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``params`` and its warm-up + cosine schedule, from ``cfg``."""
    optimizer = torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
