"""The Backbone interface: one frozen text-to-image diffusion model, whatever its architecture.

A backbone is what every method, the sampler and the training engine see of a model (PEFT's config/layer/model split
is the model for the split between it and the methods):

- ``encode_prompts(prompts) → Conditioning``: what the denoiser is conditioned on (token states, an attention mask,
  and room for SDXL's pooled embeddings and time ids in ``added``);
- ``denoise(x_t, t, cond) → prediction`` of the denoiser (the UNet), of type ``prediction_type``;
- ``scheduler``: the training noise schedule (a diffusers scheduler; samplers are built from its config);
- ``to_model(images) / to_images(x)``: images ``(B, 3, H, W)`` in [-1, 1] ↔ the space the denoiser works in
  (identity for the world's pixel-space model, the VAE for latent models);
- ``components``: the modules a LoRA may target (``"unet"``, ``"text_encoder"``) and ``apply_lora`` to put one in
  them inside a context that restores the model.

The denoiser is ``backbone.unet`` in every backbone, whatever its architecture (SD3's is a transformer). Its LoRA
component is named after the pipeline's attribute, :attr:`Backbone.denoiser`: ``"unet"``, or ``"transformer"`` for a
DiT (the prefix diffusers' ``load_lora_weights`` reads there). A bare ``LoRAWeights`` is the denoiser's, and so is a
``"unet"`` key in a mapping, whatever the backbone: methods need not know the name (:func:`as_components`).

``hyperbooth.backbones.load_backbone(folder)`` reads a model folder's ``model_index.json`` and picks the class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.errors import ConfigError
from hyperbooth.lora.inject import LoRAInjector
from hyperbooth.lora.inject import target_shapes as module_target_shapes
from hyperbooth.lora.weights import LoRAWeights

#: What a method may hand to a backbone: one UNet LoRA, or LoRAs per component (``{"unet": …, "text_encoder": …}``).
ComponentLoRA = LoRAWeights | Mapping[str, LoRAWeights]


def as_components(weights: ComponentLoRA | None, denoiser: str = "unet") -> dict[str, LoRAWeights]:
    """``LoRAWeights`` → ``{denoiser: weights}``; a mapping is copied, its ``"unet"`` key (the denoiser, as methods
    name it) renamed to ``denoiser``; ``None`` → ``{}``."""
    if weights is None:
        return {}
    if isinstance(weights, LoRAWeights):
        return {denoiser: weights}
    parts = dict(weights)
    if denoiser != "unet" and "unet" in parts:
        if denoiser in parts:
            raise ConfigError(f"the LoRA names the denoiser twice (as 'unet' and as {denoiser!r})")
        parts[denoiser] = parts.pop("unet")
    return parts


@dataclass
class Conditioning:
    """The denoiser's conditioning for a batch of B prompts.

    ``states (B, L, d)``: ``encoder_hidden_states``; ``mask (B, L)`` bool or None: ``encoder_attention_mask``;
    ``added``: extra inputs of the denoiser by name, each ``(B, …)`` (SDXL's ``text_embeds`` and ``time_ids``).
    """

    states: torch.Tensor
    mask: torch.Tensor | None = None
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.states.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(fn(self.states), None if self.mask is None else fn(self.mask), {k: fn(v) for k, v in self.added.items()})

    def take(self, n: int) -> Conditioning:
        """The first ``n`` rows."""
        return self if n == len(self) else self._map(lambda x: x[:n])

    def select(self, index: Sequence[int] | torch.Tensor) -> Conditioning:
        return self._map(lambda x: x[torch.as_tensor(index, dtype=torch.long, device=x.device)])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor to ``device``; floating-point ones (not the mask) to ``dtype``."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def replace_rows(self, index: torch.Tensor, other: Conditioning) -> Conditioning:
        """A copy whose rows ``index`` are ``other``'s rows (in order): every field, the mask and the ``added``
        inputs (SDXL's pooled embedding and time ids, SD3's pooled projections) alike."""
        def put(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            out = mine.clone()
            out[index.to(mine.device)] = theirs.to(device=mine.device, dtype=mine.dtype)
            return out

        if (self.mask is None) != (other.mask is None) or set(self.added) != set(other.added):
            raise ConfigError("cannot replace rows of a conditioning with one of other fields")
        return Conditioning(put(self.states, other.states), None if self.mask is None else put(self.mask, other.mask),
                            {k: put(v, other.added[k]) for k, v in self.added.items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of ``parts`` one after the other (each must carry the same fields)."""
        first = parts[0]
        masks = [p.mask for p in parts]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ConfigError("cannot concatenate conditionings with and without an attention mask")
        return Conditioning(
            torch.cat([p.states for p in parts]),
            None if first.mask is None else torch.cat(masks),
            {k: torch.cat([p.added[k] for p in parts]) for k in first.added},
        )

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward``."""
        kwargs = {"encoder_hidden_states": self.states, "encoder_attention_mask": self.mask}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


class Backbone(ABC):
    """A frozen text-to-image diffusion model behind one interface (see the module docstring)."""

    #: short name (``"world"``, ``"sd15"``), recorded in hypernetwork and LoRA files
    name: ClassVar[str] = ""
    #: ``model_index.json`` ``_class_name`` values this class loads
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: component → the LoRA target patterns used when a method does not name its own
    default_targets: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: the denoiser's component name (the pipeline's attribute; LoRA files' key prefix): "unet", or "transformer"
    denoiser: ClassVar[str] = "unet"

    unet: nn.Module
    scheduler: object
    path: Path
    resolution: int  # the images' side in pixels

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
        """Load a model folder (``model_index.json`` + components) with diffusers' / transformers' own loaders."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], lora: LoRAWeights | None = None) -> Conditioning:
        """Prompts → :class:`Conditioning` on the denoiser's device. ``lora``: a text-encoder LoRA applied per
        prompt (N = 1 or N = len(prompts)), for backbones with a trainable text-encoder component."""

    @abstractmethod
    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] → the denoiser's space ``(B, C, h, w)`` (``x0`` for training)."""

    @abstractmethod
    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's space → images ``(B, 3, H, W)``, about [-1, 1] (not clamped)."""

    @property
    @abstractmethod
    def components(self) -> dict[str, nn.Module]:
        """The modules a LoRA may target, by component name (``"unet"``, ``"text_encoder"``)."""

    # -- shared --------------------------------------------------------------------------------------------------

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's prediction (ε, v or x0 by :attr:`prediction_type`) for ``x_t`` at timesteps ``t (B,)``."""
        return self.unet(x_t, t, **cond.unet_kwargs()).sample

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one sample in the denoiser's space."""
        side = self.resolution // self.spatial_factor
        return (int(self.unet.config.in_channels), side, side)

    @property
    def spatial_factor(self) -> int:
        """Pixels per denoiser cell along one side (1 in pixel space, 8 for SD's VAE)."""
        return 1

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backbone:
        for module in self.components.values():
            module.to(device=device, dtype=dtype)
        return self

    def target_shapes(self, targets: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
        """UNet module name → ``(d_in, d_out)`` of the LoRA targets (``targets``: patterns; None or empty: the
        backbone's :attr:`default_targets`)."""
        patterns = tuple(targets or ()) or self.default_targets[self.denoiser]
        return module_target_shapes(self.unet, patterns)

    @contextmanager
    def apply_lora(self, weights: ComponentLoRA | None, mode: str = "per_sample", rows=None, scale: float = 1.0) -> Iterator[None]:
        """Put ``weights`` (a UNet LoRA or LoRAs by component) into the denoiser inside the context; on exit the
        model is as before, bit for bit (see :class:`~hyperbooth.lora.inject.LoRAInjector`). A text-encoder LoRA
        acts through :meth:`encode_prompts`, not here."""
        parts = as_components(weights, self.denoiser)
        unknown = set(parts) - set(self.components)
        if unknown:
            raise ConfigError(f"the {self.name} backbone has no component {sorted(unknown)[0]!r} for the LoRA (it has {', '.join(self.components)})")
        with ExitStack() as stack:
            if self.denoiser in parts:
                stack.enter_context(LoRAInjector(self.unet).apply(parts[self.denoiser], mode=mode, rows=rows, scale=scale))
            yield

    def describe(self) -> str:
        return f"{self.name} backbone {self.path} ({self.resolution}x{self.resolution}, {self.prediction_type} prediction)"
