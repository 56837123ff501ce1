"""The embedded world's text-to-image base model: a pixel-space diffusers UNet2DConditionModel.

32x32 RGB in pixel space (no VAE), conditioned on the token states of the frozen all-MiniLM-L6-v2 (384-d).
No attention at full resolution (it costs ~8x at this size); cross-attention at 16x16, 8x8 and the 4x4 middle.
``addition_embed_type="text"`` adds an attention-pooled text embedding to the time embedding, so every ResNet
block sees the prompt (global attributes such as the background need that more than cross-attention gives).
"""

from __future__ import annotations

WORLD_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 2,
    "cross_attention_dim": 384,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
}

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperbooth.errors import CheckpointError

#: The model shipped inside the package (trained by `hyperbooth train-base --config configs/world_base.yaml`).
SHIPPED_BASE_MODEL = Path(__file__).resolve().parent.parent / "assets" / "world" / "base"
RETRAIN_HINT = "retrain it with `hyperbooth train-base --config configs/world_base.yaml` (about 2 h on 2 CPU cores)"
PIPELINE_CLASS = "HyperboothWorldPipeline"


def save_world_model(folder: Path, unet, scheduler, cfg) -> Path:
    """Write a diffusers model folder: ``model_index.json``, ``unet/`` (fp16 safetensors), ``scheduler/``,
    and ``hyperbooth.json`` (text encoder, resolution, prediction type, the resolved training config)."""
    from diffusers import __version__ as diffusers_version

    from hyperbooth.config import to_dict

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet_fp16 = unet.to(torch.float16)
    unet_fp16.save_pretrained(tmp / "unet")
    unet.to(torch.float32)
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers_version,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }, indent=2))
    (tmp / "hyperbooth.json").write_text(json.dumps({
        "text_encoder": "all-MiniLM-L6-v2",
        "text_max_length": cfg.data.text_max_length,
        "resolution": cfg.data.resolution,
        "train_config": to_dict(cfg),
    }, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


@dataclass
class WorldBaseModel:
    """The world's text-to-image model: UNet + noise schedule + frozen MiniLM text encoder."""

    unet: torch.nn.Module
    scheduler: object
    text_encoder: object
    resolution: int
    path: Path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> "WorldBaseModel":
        """Load a folder written by :func:`save_world_model` with diffusers' own loaders (default: the shipped one)."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from hyperbooth.text import TextEncoder

        path = Path(path) if path is not None else SHIPPED_BASE_MODEL
        for needed in ("model_index.json", "hyperbooth.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
            if not (path / needed).is_file():
                raise CheckpointError(f"base model folder {path} lacks {needed}; {RETRAIN_HINT}")
        try:
            meta = json.loads((path / "hyperbooth.json").read_text())
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except Exception as e:  # a damaged file: say which folder and how to rebuild it
            raise CheckpointError(f"base model folder {path} is damaged ({type(e).__name__}: {e}); {RETRAIN_HINT}") from None
        text = TextEncoder.minilm(max_length=int(meta["text_max_length"]))
        return cls(unet.to(device).eval().requires_grad_(False), scheduler, text, int(meta["resolution"]), path)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, L, d)`` and mask ``(B, L)`` on the UNet's device."""
        states, mask = self.text_encoder(prompts)
        device = self.unet.device
        return states.to(device), mask.to(device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        guidance_scale: float = 3.0,
        steps: int = 30,
        seed: int = 0,
        scheduler: str = "dpm++",
    ) -> torch.Tensor:
        """Sample one image per prompt with classifier-free guidance; float tensor ``(B, 3, H, W)`` in [-1, 1].

        The conditional and unconditional branches run as one UNet call of batch ``2B``.
        """
        from hyperbooth.guidance import cfg
        from hyperbooth.sampling import denoise, make_scheduler

        n = len(prompts)
        states, mask = self.encode(["" for _ in prompts] + list(prompts))  # (2B, L, d): [uncond; cond]

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            pred = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=states, encoder_attention_mask=mask).sample
            return cfg(pred[:n], pred[n:], guidance_scale)

        sampler = make_scheduler(scheduler, self.scheduler)
        generator = torch.Generator().manual_seed(seed)
        shape = (n, self.unet.config.in_channels, self.resolution, self.resolution)
        x = denoise(model_fn, sampler, shape, steps, generator=generator, device=self.unet.device)
        return x.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> "np.ndarray":
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, H, W, 3)`` uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
