"""The optimization recipe every trainer shares: its config, AdamW, and the one learning-rate schedule (linear
warm-up, then a cosine decay to a floor), used by ``train-base``, ``train`` and the world's oracle and encoder
pre-training.

``optim.optimizer`` picks the AdamW: ``"adamw"`` (``torch.optim.AdamW``, the default) or ``"adamw8bit"``
(``bitsandbytes.optim.AdamW8bit``: the two moments stored in 8 bits, blockwise quantized — 2 bytes a parameter
instead of 8 — for tensors of at least 4096 elements, bitsandbytes' ``min_8bit_size``; smaller ones keep 32-bit
moments). bitsandbytes is not a dependency of hyperbooth (it needs CUDA): ``pip install bitsandbytes`` on the GPU
machine; without it ``"adamw8bit"`` is a :class:`~hyperbooth.errors.ConfigError` naming the package.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hyperbooth.errors import ConfigError


#: ``optim.optimizer`` → (module, class, the pip package that provides it)
OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "adamw": ("torch.optim", "AdamW", "torch"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
}


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
    optimizer: str = "adamw"  # "adamw" (torch) or "adamw8bit" (bitsandbytes' 8-bit AdamW: CUDA, pip install bitsandbytes)

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
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer={self.optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}")


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


def optimizer_class(cfg: OptimConfig) -> type[torch.optim.Optimizer]:
    """The optimizer class ``cfg.optimizer`` names; a ConfigError naming the value and the pip package when that
    package cannot be imported (``train`` asks before it loads the backbone, so a missing package fails at once)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={cfg.optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}")
    module, name, package = OPTIMIZERS[cfg.optimizer]
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # ImportError, or a bitsandbytes build that fails to load its CUDA library on import
        raise ConfigError(f"optim.optimizer={cfg.optimizer!r} needs the {package!r} package ({module}.{name}), which could "
                          f"not be imported ({type(e).__name__}: {e}): `pip install {package}` (it needs a CUDA GPU), "
                          f"or use optim.optimizer='adamw'") from e


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The AdamW ``cfg.optimizer`` names (``torch.optim.AdamW`` by default) on ``params``, and its warm-up + cosine
    schedule, from ``cfg``."""
    optimizer = optimizer_class(cfg)(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
