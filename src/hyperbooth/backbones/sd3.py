"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` folders), a DiT, as a :class:`~hyperbooth.backbones.base.Backbone`.

The denoiser is the MMDiT ``SD3Transformer2DModel``: ``backbone.unet`` is that transformer (the name every method
uses for "the denoiser"), and its LoRA component is ``"transformer"`` (:attr:`denoiser`), the prefix diffusers'
``StableDiffusion3Pipeline.load_lora_weights`` reads (``transformer.<module>.lora_A.weight``). A method's bare
``LoRAWeights`` or ``{"unet": …}`` is the transformer's (:func:`~hyperbooth.backbones.base.as_components`).

- **Conditioning**: the prompts through the pipeline's own ``encode_prompt`` (two CLIP text encoders, penultimate
  layer, concatenated and zero-padded to T5's width, followed by T5's tokens; zeros where the folder has no T5), so
  hyperbooth's CFG samples what the pipeline samples. ``Conditioning.states`` is ``prompt_embeds (B, 77 + 256,
  joint_attention_dim)``; ``added["pooled_projections"] (B, pooled_projection_dim)`` the two pooled CLIP embeddings.
- **Flow matching** (Esser et al. 2024): ``x_t = (1 − σ) x_0 + σ ε``, the transformer predicts ``v = ε − x_0`` at
  timestep ``t = σ · 1000``; :attr:`prediction_type` is ``"flow"``. Training goes through
  :mod:`hyperbooth.diffusion`, which dispatches on the ``FlowMatchEulerDiscreteScheduler``; sampling's ``"euler"``
  is that scheduler itself (:func:`hyperbooth.sampling.make_scheduler`).
- **Latents**: the 16-channel VAE, ``z = (E(x) − shift_factor) · scaling_factor`` and back, as the pipeline does.
- **LoRA targets** (:data:`DEFAULT_SD3_TARGETS`): every joint block's attention projections, image and text stream
  (``to_q``/``to_k``/``to_v``/``to_out.0``, ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out``; SD3.5's
  ``attn2`` too), and the image stream's MLP (``ff.net.0.proj``, ``ff.net.2``). The text encoders take no LoRA.
- **HM-CFG** runs as on SD: ``[B(∅); B(c); P(c)]`` in one transformer call, the base rows without the LoRA. SD3 is
  trained with a null-prompt branch (classifier-free guidance is its default), so v_B(∅) exists and HM-CFG means the
  same as on SD 1.5. Its timestep schedule (``pers_interval``) reads ``t/T``, which on SD3 is the shifted σ
  (shift 3 puts half of a sampler's steps above σ ≈ 0.75): the same interval covers other steps than on SD 1.5.
- **LoRA files**: diffusers layout ``transformer.<module>.lora_A/B.weight``; the kohya-style layout writes
  ``lora_transformer_<module with . → _>.lora_down/lora_up/alpha``, diffusers' module names, which ComfyUI reads for
  SD3 (kohya's own SD3 trainer names the original MMDiT's fused modules instead, which hyperbooth does not write).

HM-CFG on a guidance-distilled model (Flux-dev; no such backbone here). Such a model has no unconditional branch:
the guidance scale is an input of the transformer, and one call gives the already-guided prediction ``v(c; g)``.
HM-CFG's ``v_B(∅)`` does not exist there, so its formula cannot be evaluated; the nearest rule is
``v_B(c; g) + w_pers · (v_P(c; g) − v_B(c; g))``, an extrapolation from the base model's guided prediction toward
the personalized model's at the same embedded scale ``g`` (``w_pers = 0``: the base model; ``w_pers = 1``: the
personalized model), with ``w_base`` replaced by ``g``. That is a different rule, not HM-CFG, and a backbone of such a
model must refuse ``guidance="hm-cfg"`` with a ConfigError naming it rather than run it under the same name.

Why SD3 rather than Flux as the first DiT: SD3 keeps true classifier-free guidance (so CFG and HM-CFG carry over
unchanged), its latents are ordinary ``(B, 16, h, w)`` tensors (Flux packs them into a token sequence with image and
text position ids), and its scheduler uses a fixed shift (Flux's depends on the image size through ``mu``).

The folder may omit T5 (``text_encoder_3``/``tokenizer_3`` null in ``model_index.json``, the pipeline's low-memory
option): its tokens are then zeros, as in the pipeline. The pipeline object is kept (``backbone.pipe``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone, Conditioning
from hyperbooth.diffusion import FLOW
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.weights import LoRAWeights

#: SD3's MMDiT LoRA targets: attention projections of both streams and the image stream's MLP.
DEFAULT_SD3_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
)
#: T5's token count of the pipeline's ``__call__`` default (``max_sequence_length``)
MAX_SEQUENCE_LENGTH = 256


class StableDiffusion3Backbone(Backbone):
    """SD3Transformer2DModel + 16-channel VAE + CLIP-L/CLIP-G (+ T5) of a ``StableDiffusion3Pipeline`` folder."""

    name: ClassVar[str] = "sd3"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    default_targets: ClassVar[dict[str, tuple[str, ...]]] = {"transformer": DEFAULT_SD3_TARGETS}
    denoiser: ClassVar[str] = "transformer"

    def __init__(self, pipe, path: Path):
        self.pipe = pipe
        self.path = Path(path)
        self.unet, self.vae, self.scheduler = pipe.transformer, pipe.vae, pipe.scheduler  # unet: the transformer
        self.text_encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        for module in (self.unet, self.vae, *self.text_encoders):
            module.eval().requires_grad_(False)
        self.resolution = int(self.unet.config.sample_size) * self.spatial_factor

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusion3Backbone:
        from diffusers import StableDiffusion3Pipeline

        # a folder without T5 (null entries) loads only when told so: diffusers requires the components named
        absent = {}
        index = Path(path) / "model_index.json"
        if index.is_file():
            try:
                entries = json.loads(index.read_text())
            except ValueError as e:
                raise CheckpointError(f"{index} cannot be read as JSON ({e})") from None
            absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if entries.get(k, [None])[0] is None}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **absent)
        except Exception as e:  # a damaged or foreign folder: name it
            raise CheckpointError(f"Stable Diffusion 3 pipeline folder {str(path)!r} cannot be loaded ({type(e).__name__}: {e})") from None
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            raise CheckpointError(f"{path}: its scheduler shifts timesteps by resolution (use_dynamic_shifting), which the SD3 backbone does not support")
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), path)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"transformer": self.unet}

    @property
    def prediction_type(self) -> str:
        return FLOW

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> StableDiffusion3Backbone:
        self.pipe.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], lora: LoRAWeights | None = None) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` of each prompt (the same text for all three encoders)."""
        if lora is not None:
            raise ConfigError("the sd3 backbone takes no text-encoder LoRA (its LoRA targets are the transformer's)")
        states, _, pooled, _ = self.pipe.encode_prompt(list(prompts), prompt_2=None, prompt_3=None, device=self.device,
                                                       do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return Conditioning(states.to(self.dtype), added={"pooled_projections": pooled.to(self.dtype)})

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity ``ε − x_0`` predicted for ``x_t`` at timesteps ``t = σ · 1000`` ``(B,)``."""
        return self.unet(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.states,
                         pooled_projections=cond.added["pooled_projections"]).sample

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.mean
        config = self.vae.config
        return ((latents - (config.shift_factor or 0.0)) * config.scaling_factor).to(self.device)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return self.vae.decode(x.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)).sample
