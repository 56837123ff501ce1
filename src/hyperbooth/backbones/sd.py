"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` folders) as a :class:`~hyperbooth.backbones.base.Backbone`.

Latent space: ``to_model`` is the VAE's encoder (the posterior's mean, times ``vae.config.scaling_factor``; the mean
rather than a draw, so training batches are a function of their seeds alone), ``to_images`` its decoder. Prompts go
through the pipeline's CLIP tokenizer (padded to ``model_max_length``, 77) and text encoder, as
``StableDiffusionPipeline.encode_prompt`` does, so hyperbooth's CFG samples what the pipeline samples. LoRA targets:
the UNet's attention projections and, optionally, the CLIP text encoder's.

The pipeline object itself is kept (``backbone.pipe``): ``pipe.load_lora_weights`` and diffusers' other tools work on
the same modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone, Conditioning
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.inject import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, LoRAInjector
from hyperbooth.lora.weights import LoRAWeights

log = logging.getLogger(__name__)


class StableDiffusionBackbone(Backbone):
    """UNet + VAE + CLIP text encoder of a ``StableDiffusionPipeline`` folder."""

    name: ClassVar[str] = "sd15"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    default_targets: ClassVar[dict[str, tuple[str, ...]]] = {"unet": DEFAULT_UNET_TARGETS, "text_encoder": DEFAULT_TEXT_ENCODER_TARGETS}
    #: what errors call the folder
    label: ClassVar[str] = "Stable Diffusion"

    def __init__(self, pipe, path: Path):
        self.pipe = pipe
        self.path = Path(path)
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.scheduler = pipe.scheduler
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        self.resolution = int(self.unet.config.sample_size) * self.spatial_factor
        self._warned: set[str] = set()  # prompts whose truncation was already reported

    @classmethod
    def _load_pipeline(cls, path, dtype: torch.dtype):
        # diffusers' pipelines import transformers' models (seconds): loaded when a pipeline is, not with the package
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None, requires_safety_checker=False)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionBackbone:
        try:
            pipe = cls._load_pipeline(path, dtype)
        except Exception as e:  # a damaged or foreign folder (transformers/safetensors raise many types): name it
            raise CheckpointError(f"{cls.label} pipeline folder {str(path)!r} cannot be loaded ({type(e).__name__}: {e})") from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), path)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> StableDiffusionBackbone:
        self.pipe.to(device=device, dtype=dtype)
        return self

    def _tokens(self, tokenizer, prompts: list[str]):
        """The pipeline's tokens: padded to ``model_max_length`` (77) and truncated, naming what is dropped once."""
        max_length = tokenizer.model_max_length
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        room = max_length - tokenizer.num_special_tokens_to_add()
        for prompt, ids in zip(prompts, tokenizer(prompts, add_special_tokens=False).input_ids):
            if len(ids) > room and prompt not in self._warned:  # as the pipeline does: name what CLIP will not see
                self._warned.add(prompt)
                log.warning("prompt %r is %d tokens, CLIP sees %d: this part is dropped: %r", prompt[:40], len(ids), room,
                            tokenizer.decode(ids[room:])[:120])
        return tokens

    def _text_states(self, prompts: list[str]) -> torch.Tensor:
        """``(B, 77, d)``: the tokens of ``StableDiffusionPipeline.encode_prompt`` through the text encoder. No
        ``no_grad`` here: the encoder is frozen, so only a text-encoder LoRA being trained builds a graph."""
        tokens = self._tokens(self.tokenizer, prompts)
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def encode_prompts(self, prompts: Sequence[str], lora: LoRAWeights | None = None) -> Conditioning:
        """CLIP token states ``(B, 77, d)``; no attention mask (SD attends to the padding, as its pipeline does).
        ``lora``: a text-encoder LoRA of N subjects, prompt ``i`` with subject ``i mod N`` (one for every prompt, one
        per prompt, or one per prompt of each CFG half)."""
        prompts = list(prompts)
        if lora is None:
            states = self._text_states(prompts)
        else:
            if len(prompts) % lora.num_subjects:
                raise ConfigError(f"{len(prompts)} prompts but the text-encoder LoRA holds {lora.num_subjects} subjects (prompt i takes subject i mod N)")
            with LoRAInjector(self.text_encoder).apply(lora, mode="per_sample"):
                states = self._text_states(prompts)
        return Conditioning(states.to(device=self.device, dtype=self.dtype))

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.device)  # where the denoiser runs (the VAE may be elsewhere)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
