"""The embedded world's text-to-image model as a :class:`~hyperbooth.backbones.base.Backbone`.

A pixel-space diffusers ``UNet2DConditionModel`` on 32x32 RGB (no VAE: ``to_model``/``to_images`` are the identity),
conditioned on the token states of the frozen all-MiniLM-L6-v2 (384-d) with their padding mask. Its folder is a
diffusers model folder (``model_index.json`` names ``HyperboothWorldPipeline``; ``unet/``, ``scheduler/``) plus
``hyperbooth.json`` (text encoder, resolution, the training config), written by
:func:`hyperbooth.world.base_model.save_world_model`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone, Conditioning
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.inject import DEFAULT_UNET_TARGETS
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.text import TextEncoder
from hyperbooth.world.base_model import PIPELINE_CLASS, RETRAIN_HINT, SHIPPED_BASE_MODEL

_NEEDED = ("model_index.json", "hyperbooth.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


@dataclass(eq=False)
class WorldBackbone(Backbone):
    """The world's model: UNet + noise schedule + frozen MiniLM text encoder (cached per prompt)."""

    name: ClassVar[str] = "world"
    pipeline_classes: ClassVar[tuple[str, ...]] = (PIPELINE_CLASS,)
    default_targets: ClassVar[dict[str, tuple[str, ...]]] = {"unet": DEFAULT_UNET_TARGETS}

    unet: nn.Module
    scheduler: object
    text_encoder: TextEncoder
    resolution: int
    path: Path

    @classmethod
    def from_pretrained(cls, path=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WorldBackbone:
        """Load a folder written by :func:`~hyperbooth.world.base_model.save_world_model` (default: the shipped one)."""
        # diffusers' model classes import slowly (seconds): loaded when a model is, not with the package
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = Path(path) if path is not None else SHIPPED_BASE_MODEL
        for needed in _NEEDED:
            if not (path / needed).is_file():
                raise CheckpointError(f"base model folder {path} lacks {needed}; {RETRAIN_HINT}")
        try:
            meta = json.loads((path / "hyperbooth.json").read_text())
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except Exception as e:  # a damaged file: say which folder and how to rebuild it
            raise CheckpointError(f"base model folder {path} is damaged ({type(e).__name__}: {e}); {RETRAIN_HINT}") from None
        text = TextEncoder.minilm(max_length=int(meta["text_max_length"]))
        unet = unet.to(device).eval().requires_grad_(False)
        return cls(unet, scheduler, text, int(meta["resolution"]), path)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def encode_prompts(self, prompts: Sequence[str], lora: LoRAWeights | None = None) -> Conditioning:
        """MiniLM token states ``(B, L, 384)`` and mask ``(B, L)`` on the UNet's device (states in its dtype)."""
        if lora is not None:
            raise ConfigError("the world's text encoder is frozen and takes no LoRA")
        states, mask = self.text_encoder(list(prompts))
        return Conditioning(states.to(device=self.device, dtype=self.dtype), mask.to(self.device))

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return x
