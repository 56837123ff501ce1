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


#: The UNet2DConditionModel config of SDXL 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): three
#: levels (the first without attention), two text encoders' states concatenated (768 + 1280 = 2048), the pooled text
#: embedding and six size/crop numbers added to the time embedding ("text_time": 6·256 + 1280 = 2816).
SDXL_UNET_CONFIG: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "use_linear_projection": True,
}

#: The second text encoder of the tiny SDXL (CLIPTextModelWithProjection, SDXL's OpenCLIP bigG in transformers' form):
#: a width other than the first's, so that the order of the concatenation matters.
TINY_TEXT2_CONFIG: dict = {**TINY_TEXT_CONFIG, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 24}

#: A tiny UNet of SDXL's family: the first level without attention, two resnets per level (SDXL's SGM block numbering:
#: ``input_blocks.4.1`` is ``down_blocks.1.attentions.0`` here as there), two transformer layers at the second level,
#: linear proj_in/proj_out, and the "text_time" added conditioning (6 · 8 + 24 = 72).
TINY_SDXL_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": TINY_TEXT_CONFIG["hidden_size"] + TINY_TEXT2_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_TEXT2_CONFIG["projection_dim"],
    "norm_num_groups": 8,
    "use_linear_projection": True,
}


def tiny_sdxl_pipeline(folder: str | os.PathLike, seed: int = 0):
    """Build a tiny ``StableDiffusionXLPipeline`` of SDXL's own classes (two CLIP text encoders, the second with its
    projection; the second tokenizer pads with "!" as SDXL's does; Euler with SDXL's schedule; the VAE's SDXL scaling
    factor) and ``save_pretrained`` it to ``folder``. Returns the folder (16x16 images, 8x8 latents)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).eval()
    vae = AutoencoderKL(**TINY_VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=100, **TINY_TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=100, **TINY_TEXT2_CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _write_tiny_clip_tokenizer(Path(tmp))
        tokenizer_2 = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


#: A tiny SD3Transformer2DModel of SD3's family (stabilityai/stable-diffusion-3-medium-diffusers has patch 2, 16 latent
#: channels, 24 joint blocks of 24 heads × 64, joint_attention_dim 4096 = T5's width, pooled 2048 = CLIP-L's 768 +
#: CLIP-G's 1280): two joint blocks (the last one "context pre-only", without to_add_out or the text MLP, as in SD3),
#: text states 32 + 48 = 80 zero-padded to 96, pooled 32 + 48 = 80.
TINY_SD3_TRANSFORMER_CONFIG: dict = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 96,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 80,
    "pos_embed_max_size": 16,
}


def tiny_sd3_pipeline(folder: str | os.PathLike, seed: int = 0):
    """Build a tiny ``StableDiffusion3Pipeline`` of SD3's own classes (SD3Transformer2DModel, a 16-channel VAE with
    SD3's scaling and shift factors, two ``CLIPTextModelWithProjection`` of different widths, FlowMatchEuler with
    SD3's shift 3.0) without T5 (``text_encoder_3``/``tokenizer_3`` null: the pipeline then gives zeros for T5's
    tokens) and ``save_pretrained`` it to ``folder``. Returns the folder (16x16 images, 8x8 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG).eval()
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "latent_channels": 16}, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=100, **TINY_TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=100, **{**TINY_TEXT_CONFIG, "hidden_size": 48, "projection_dim": 48}))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _write_tiny_clip_tokenizer(Path(tmp))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder
