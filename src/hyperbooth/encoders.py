"""Image encoders behind one interface: images ``(B, 3, H, W)`` in [-1, 1] → tokens ``(B, T, D)``.

- :class:`VisionTransformersEncoder`: any transformers vision model from a local folder or hub id (CLIP vision,
  DINOv2, ViT), frozen, with its own preprocessing (resize + normalization read from its image processor config).
- :class:`WorldImageEncoder`: a small CNN for the embedded world's 32x32 images (8x8 = 64 tokens), either trained
  with the hypernetwork (``"world"``) or pre-trained on world renders and frozen (``"world-pretrained"``: the
  shipped weights, see :mod:`hyperbooth.world.pretrain`), the world's counterpart of a frozen CLIP/DINO/face-ID
  encoder.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.errors import CheckpointError

#: The frozen, pre-trained world encoder shipped inside the package (``hyperbooth world train-encoder``).
SHIPPED_WORLD_ENCODER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "world", "encoder")
WORLD_ENCODER_WEIGHTS = "world_encoder.safetensors"


class WorldImageEncoder(nn.Module):
    """32x32 → 8x8 grid of ``dim``-d tokens with learned positions. ~0.4M parameters."""

    trainable = True

    def __init__(self, dim: int = 128, width: int = 64):
        super().__init__()

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.net = nn.Sequential(block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 1), block(2 * width, dim, 2))
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.out_dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        h = self.net(images)  # (B, dim, 8, 8)
        return h.flatten(2).transpose(1, 2) + self.pos  # (B, 64, dim)


class VisionTransformersEncoder(nn.Module):
    """A frozen transformers vision model (``AutoModel``) with the resize/normalization of its image processor."""

    trainable = False

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(path)
            vision_config = getattr(config, "vision_config", config)
            model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"image encoder {str(path)!r} cannot be loaded ({type(e).__name__}: {e})") from None
        self.model = getattr(model, "vision_model", model).eval().requires_grad_(False)
        self.path = str(path)
        self.image_size = int(getattr(vision_config, "image_size", 224))
        self.out_dim = int(vision_config.hidden_size)
        mean, std = _processor_stats(path)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # frozen: always eval (no dropout / batch-norm updates)
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2  # [0, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return self.model(pixel_values=x).last_hidden_state  # (B, T, D)


def _processor_stats(path) -> tuple[list[float], list[float]]:
    """Normalization mean/std from the model's image processor config; ImageNet's if it has none."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError):
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load_world_encoder(folder: str | os.PathLike | None = None) -> WorldImageEncoder:
    """The pre-trained world encoder from ``folder`` (default: the shipped one), frozen."""
    from safetensors.torch import load_file

    folder = folder or SHIPPED_WORLD_ENCODER
    path = os.path.join(folder, WORLD_ENCODER_WEIGHTS)
    try:
        state = load_file(path)
    except Exception as e:
        raise CheckpointError(
            f"world encoder weights {path} are missing or damaged ({type(e).__name__}); "
            "retrain them with `hyperbooth world train-encoder` (a few minutes on 2 CPU cores)"
        ) from None
    encoder = WorldImageEncoder(dim=state["pos"].shape[-1], width=state["net.0.0.weight"].shape[0])
    encoder.load_state_dict(state)
    encoder.trainable = False
    return encoder.eval().requires_grad_(False)


def encode_images(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder(images)`` — without autograd for a frozen encoder (``trainable`` False), which nothing trains."""
    if getattr(encoder, "trainable", True):
        return encoder(images)
    with torch.no_grad():
        return encoder(images)


def build_encoder(name: str, dim: int = 128) -> nn.Module:
    """``"world"`` → a :class:`WorldImageEncoder` trained with the hypernetwork; ``"world-pretrained"`` → the
    shipped pre-trained one, frozen; anything else is a transformers model folder or hub id (frozen)."""
    if name == "world":
        return WorldImageEncoder(dim=dim)
    if name == "world-pretrained":
        return load_world_encoder()
    return VisionTransformersEncoder(name)
