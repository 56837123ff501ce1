"""Exponential moving average of the trained parameters (Polyak averaging): diffusers' ``EMAModel``.

After every optimizer step ``θ_ema ← d_k · θ_ema + (1 − d_k) · θ`` with ``d_k = min(decay, k / (9 + k))`` at update
``k`` (``EMAModel``'s warm-up; ``d_1 = 0``: the first update copies θ). Its ``state_dict`` holds only numbers and a
list of tensors, so a checkpoint holding it loads with ``torch.load(weights_only=True)`` and a resumed run continues
it exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


def build_ema(params: Iterable[torch.nn.Parameter], decay: float) -> EMAModel | None:
    """An ``EMAModel`` over ``params`` (pass only the trained ones: a frozen encoder needs no shadow copy);
    ``decay = 0`` → None (no EMA)."""
    if decay <= 0:
        return None
    return EMAModel(list(params), decay=decay)


def load_ema(ema: EMAModel, state: dict, device: torch.device | str) -> None:
    """Restore a checkpointed ``EMAModel.state_dict()`` onto ``device``."""
    ema.load_state_dict(state)
    ema.to(device=device)
