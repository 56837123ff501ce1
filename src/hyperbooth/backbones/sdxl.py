"""Stable Diffusion XL (``StableDiffusionXLPipeline`` folders) as a :class:`~hyperbooth.backbones.base.Backbone`.

The SD 1.x backbone (:class:`~hyperbooth.backbones.sd.StableDiffusionBackbone`: UNet, VAE latents, CLIP tokens) with
SDXL's conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` make it:

- ``states (B, 77, d1 + d2)``: the penultimate hidden states of both text encoders (``CLIPTextModel``, then
  ``CLIPTextModelWithProjection``), concatenated;
- ``added["text_embeds"] (B, p)``: the second encoder's pooled, projected embedding;
- ``added["time_ids"] (B, 6)``: original size, crop top-left, target size: ``(R, R, 0, 0, R, R)`` at the backbone's
  resolution ``R`` (the pipeline's default for its default size; training images are resized and centre-cropped to
  ``R``, so the same numbers describe them).

The empty prompt: SDXL was trained with dropped conditioning set to zeros, and its pipeline samples CFG's
unconditional branch from zeros (``force_zeros_for_empty_prompt``, true in SDXL's folders) when no negative prompt is
given. hyperbooth's unconditional rows are the prompt ``""``, so with that flag ``encode_prompts`` gives zeros (states
and pooled embedding; the time ids stay) for every ``""``: CFG and HM-CFG sample what the pipeline samples, and
training's condition dropout (prompts set to ``""``) drops the way SDXL's training did. A folder with the flag false
encodes ``""`` through the encoders, as its pipeline then does.

LoRA components: ``"unet"``, ``"text_encoder"`` and ``"text_encoder_2"``; ``encode_prompts(prompts, lora=…)`` takes
one text-encoder LoRA (the first encoder's) or LoRAs by component. Their files: :mod:`hyperbooth.lora.io` (kohya's
SDXL names for this backbone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.backbones.base import Conditioning
from hyperbooth.backbones.sd import StableDiffusionBackbone
from hyperbooth.errors import ConfigError
from hyperbooth.lora.inject import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, LoRAInjector
from hyperbooth.lora.weights import LoRAWeights

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """UNet + VAE + two CLIP text encoders of a ``StableDiffusionXLPipeline`` folder."""

    name: ClassVar[str] = "sdxl"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    default_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        "unet": DEFAULT_UNET_TARGETS, "text_encoder": DEFAULT_TEXT_ENCODER_TARGETS, "text_encoder_2": DEFAULT_TEXT_ENCODER_TARGETS}
    label: ClassVar[str] = "Stable Diffusion XL"

    def __init__(self, pipe, path):
        super().__init__(pipe, path)
        self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
        self.text_encoder_2.eval().requires_grad_(False)
        self.zero_empty_prompts = bool(pipe.config.get("force_zeros_for_empty_prompt", True))

    @classmethod
    def _load_pipeline(cls, path, dtype: torch.dtype):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def time_ids(self, n: int) -> torch.Tensor:
        """``(n, 6)``: original size, crop top-left and target size of SDXL's micro-conditioning, ``(R, R, 0, 0, R, R)``."""
        side = self.resolution
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=self.dtype, device=self.device).repeat(n, 1)

    def _text_loras(self, lora: LoRAWeights | Mapping[str, LoRAWeights] | None, n: int) -> dict[str, LoRAWeights]:
        if lora is None:
            return {}
        loras = {"text_encoder": lora} if isinstance(lora, LoRAWeights) else dict(lora)
        for comp, w in loras.items():
            if comp not in TEXT_COMPONENTS:
                raise ConfigError(f"the sdxl backbone's text encoders are {', '.join(TEXT_COMPONENTS)}; got a LoRA for {comp!r}")
            if n % w.num_subjects:
                raise ConfigError(f"{n} prompts but the {comp} LoRA holds {w.num_subjects} subjects (prompt i takes subject i mod N)")
        return loras

    def encode_prompts(self, prompts: Sequence[str], lora: LoRAWeights | Mapping[str, LoRAWeights] | None = None) -> Conditioning:
        """SDXL's conditioning of the module docstring, on the UNet's device and dtype. ``lora``: a LoRA of the first
        text encoder, or LoRAs by component (``{"text_encoder": …, "text_encoder_2": …}``), of N subjects: prompt
        ``i`` with subject ``i mod N``. No ``no_grad``: the encoders are frozen, only a LoRA being trained builds a graph."""
        prompts = list(prompts)
        loras = self._text_loras(lora, len(prompts))
        states, pooled = [], None
        for comp, tokenizer, encoder in (("text_encoder", self.tokenizer, self.text_encoder), ("text_encoder_2", self.tokenizer_2, self.text_encoder_2)):
            ids = self._tokens(tokenizer, prompts).input_ids.to(encoder.device)
            with LoRAInjector(encoder).apply(loras[comp], mode="per_sample") if comp in loras else nullcontext():
                out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # as the pipeline: the pooled embedding is the (last) encoder's 2-D first output
                pooled = out[0]
            states.append(out.hidden_states[-2].to(self.device))  # (B, 77, d_k): the penultimate layer
        states = torch.cat(states, dim=-1)  # (B, 77, d1 + d2)
        if self.zero_empty_prompts:
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            if empty.any():
                states = states.masked_fill(empty[:, None, None], 0.0)
                pooled = pooled.to(self.device).masked_fill(empty[:, None], 0.0)
        added = {"text_embeds": pooled.to(device=self.device, dtype=self.dtype), "time_ids": self.time_ids(len(prompts))}
        return Conditioning(states.to(dtype=self.dtype), added=added)

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's per-channel latent mean and std when its config gives them (the pipeline then uses them)."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return torch.tensor(mean).view(shape), torch.tensor(std).view(shape)

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats()
        if stats is None:
            return super().to_model(images)
        latents = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.mean
        mean, std = (s.to(latents) for s in stats)
        return ((latents - mean) * self.vae.config.scaling_factor / std).to(self.device)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats()
        if stats is None:
            return super().to_images(x)
        mean, std = (s.to(device=x.device, dtype=self.vae.dtype) for s in stats)
        return self.vae.decode(x.to(self.vae.dtype) * std / self.vae.config.scaling_factor + mean).sample
