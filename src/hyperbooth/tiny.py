"""The real architectures (SD 1.5's UNet, VAE, CLIP text encoder; a CLIP vision encoder) built small from configs,
with random weights.

No pretrained weights can be downloaded here, so tests, benchmarks and the offline demo exercise the same classes
and the same loading calls (``save_pretrained`` / ``from_pretrained``) on models built from these configs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

#: The UNet2DConditionModel config of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": False,
}

#: A tiny UNet of the same family: two levels, attention in both, 1x1-conv proj_in/proj_out as in SD 1.5.
TINY_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "use_linear_projection": False,
}

TINY_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
}

TINY_TEXT_CONFIG: dict = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    # the ids of the tiny tokenizer's <|startoftext|> / <|endoftext|> (CLIP pads with <|endoftext|>)
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}

#: A tiny CLIP vision tower (transformers' CLIPVisionModel, the encoder family of SD-scale hypernetworks).
TINY_VISION_CONFIG: dict = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}


def tiny_unet(seed: int = 0, **overrides):
    """A tiny ``UNet2DConditionModel`` (SD 1.5 block types), seeded, in eval mode."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides}).eval()


def _write_tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (no merges): enough to tokenize any lowercase prompt."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789!,.-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sd_pipeline(folder: str | os.PathLike, seed: int = 0):
    """Build a tiny ``StableDiffusionPipeline`` of SD 1.5's own classes and ``save_pretrained`` it to ``folder``.

    Returns the folder, which ``StableDiffusionPipeline.from_pretrained(folder)`` loads like a real SD 1.5 folder.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = tiny_unet(seed=seed)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=100, **TINY_TEXT_CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _write_tiny_clip_tokenizer(Path(tmp))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_clip_vision_encoder(folder: str | os.PathLike, seed: int = 0):
    """Build a tiny ``CLIPVisionModel`` and ``save_pretrained`` it to ``folder`` with a ``CLIPImageProcessor`` beside
    it (CLIP's normalization, 32x32 input), the layout of a real image-encoder folder such as
    openai/clip-vit-large-patch14. Returns the folder: ``E2EConfig(encoder=str(folder))`` loads it."""
    folder = Path(folder)
    torch.manual_seed(seed)
    side = TINY_VISION_CONFIG["image_size"]
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_CONFIG)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return folder
