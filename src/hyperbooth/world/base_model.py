"""The embedded world's text-to-image base model: its UNet config and its model folder (loaded as a backbone by
:class:`hyperbooth.backbones.world.WorldBackbone`). A pixel-space diffusers UNet2DConditionModel.

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
from pathlib import Path

import torch

from hyperbooth.errors import CheckpointError

#: The model shipped inside the package: `hyperbooth train-base --config configs/world_base.yaml` (stage 1, class-only
#: captions), continued by `--config configs/world_base_captions.yaml` (stage 2, captions that sometimes describe the
#: subject's colours and pattern).
SHIPPED_BASE_MODEL = Path(__file__).resolve().parent.parent / "assets" / "world" / "base"
RETRAIN_HINT = ("retrain it with `hyperbooth train-base --config configs/world_base.yaml`, then "
                "`--config configs/world_base_captions.yaml` (about 1.5 h on 2 CPU cores)")
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
