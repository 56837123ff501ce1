"""Training memory per GPU for an e2e hypernetwork on Stable Diffusion 1.5 (512x512), SDXL (1024x1024) or SD3 medium
(1024x1024) — an estimate, made without a GPU and without weights.

Every model is built from its published configuration on PyTorch's ``meta`` device (shapes only, no memory, nothing
downloaded): the backbone the preset trains on (SD 1.5: UNet, VAE, CLIP ViT-L/14 text encoder; SDXL: its UNet, VAE,
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders; SD3 medium: its MMDiT transformer, 16-channel VAE, CLIP-L, CLIP-G
and T5-XXL text encoders), the CLIP ViT-L/14 vision tower (openai/clip-vit-large-patch14, the hypernetwork's frozen
image encoder) and the hypernetwork the preset (``configs/e2e_sd15.yaml``, ``e2e_sdxl.yaml``, ``e2e_sd3.yaml``) builds
for that backbone's LoRA targets. Two things are counted:

- **weights and optimizer state**: parameters × bytes. Frozen backbone in bf16 (``mixed_precision: bf16`` loads it so,
  all of it: the engine keeps every text encoder on the GPU), the frozen CLIP vision tower in fp32 (loaded as stored),
  the hypernetwork's trained parameters in fp32 with their gradients (4 + 4 bytes a parameter) and AdamW's two
  moments: 8 bytes with ``optim.optimizer: adamw``; with ``adamw8bit`` (bitsandbytes' ``AdamW8bit``) 2 bytes plus
  two fp32 absmax per block of 256 (2.03 bytes) for tensors of at least 4096 elements (bitsandbytes'
  ``min_8bit_size``), 8 for the smaller ones; plus 4 for EMA when ``optim.ema_decay > 0``, and 4 for DDP's gradient
  buckets on more than one GPU. Sharded modes on G GPUs: ZeRO-2 (``configs/accelerate/deepspeed_zero2.yaml``;
  ``hyperbooth train`` refuses DeepSpeed, the row is for comparison) splits the gradients and the optimizer moments G
  ways (no DDP buckets); FSDP2 as the engine runs it (``configs/accelerate/fsdp.yaml``; the personalizer is one FSDP
  unit, fp32 as under DDP; 8-bit AdamW refused) also splits the trained weights, the frozen image encoder and the
  EMA, but gathers the whole personalizer in fp32 for its forward and backward and holds its unsharded fp32 gradients
  until the reduce-scatter. Neither
  touches the frozen backbone, which is outside the module the engine prepares, nor the activations;
- **activations per sample**: one training forward pass of the denoiser (bf16, the per-sample LoRA of the
  hypernetwork in its target layers; SD 1.5 64x64 latents and 77 tokens of 768, SDXL 128x128 latents, 77 tokens of
  2048, pooled 1280 and the six time ids, SD3 128x128x16 latents (4096 patches), 77 + 256 tokens of 4096, pooled 2048)
  and of the hypernetwork's decoder runs on meta tensors, and every tensor autograd saves for the backward pass is
  summed (``torch.autograd.graph.saved_tensors_hooks``). Attention is counted as the fused kernels (flash /
  memory-efficient SDPA, what PyTorch 2 uses on a GPU) keep it: q, k, v, the output and a per-row log-sum-exp, not
  the L×L probabilities. With gradient checkpointing (``gradient_checkpointing: true``) the checkpointed blocks keep
  only their inputs, and one block at a time is recomputed in the backward pass: saved = outside the blocks + the
  blocks' inputs + the largest block's own activations. The hypernetwork's decoder is counted in fp32 (on meta there
  is no autocast): an upper bound for that part.

Not counted: the CUDA context and allocator fragmentation (~0.5–1 GB), the transient working memory of single ops,
the frozen VAE encoder's and the encoders' no-grad passes (freed as they go, before the denoiser's forward; a few
hundred MB a sample at 512x512, about four times that at 1024x1024). So the figures are a floor to plan with, not a
measurement.

    python benchmarks/train_memory.py [--preset configs/e2e_sdxl.yaml] [--batch-per-gpu 1 4 8] [--gpus 1 8]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel,
                          T5Config, T5EncoderModel)

from hyperbooth.lora.inject import LoRAInjector, target_shapes
from hyperbooth.lora.weights import LoRALayer, LoRAWeights
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.tiny import SD15_UNET_CONFIG, SDXL_UNET_CONFIG
from hyperbooth.train.engine import load_train_config

#: SD 1.5's VAE (runwayml/stable-diffusion-v1-5, vae/config.json); SDXL's has the same layout (other scaling factor)
SD15_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                   "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                   "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512}
#: SD3's VAE (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json): 16 latent channels, no quant convs
SD3_VAE_CONFIG = {**SD15_VAE_CONFIG, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
#: SD 1.5's text encoder, CLIP ViT-L/14's text tower (text_encoder/config.json); SDXL's first and SD3's first too
SD15_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
#: OpenCLIP ViT-bigG/14's text tower: SDXL's and SD3's text_encoder_2 (CLIPTextModelWithProjection)
CLIP_G_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"}
#: T5 v1.1 XXL's encoder: SD3's text_encoder_3 (T5EncoderModel)
T5_XXL_CONFIG = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                 "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
#: SD3 medium's MMDiT (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json)
SD3_MEDIUM_TRANSFORMER_CONFIG = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                                 "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                                 "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}
#: T5's token count in SD3's prompt states (the pipeline's max_sequence_length), after CLIP's 77
SD3_T5_TOKENS = 256
#: openai/clip-vit-large-patch14's vision tower
CLIP_L14_VISION_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "image_size": 224, "patch_size": 14, "projection_dim": 768}
PRESET = "configs/e2e_sd15.yaml"
GB = 1024**3
#: bitsandbytes' 8-bit optimizers: tensors below ``min_8bit_size`` elements keep 32-bit state; blockwise quantization
#: keeps one fp32 absmax per block of 256 for each of the two moments
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256
#: ZeRO-2 and FSDP on this many GPUs in the sharded table
SHARDED_GPUS = 8


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _FusedAttention(torch.autograd.Function):
    """``scaled_dot_product_attention`` as the fused kernels store it for backward: q, k, v, out, logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, h, Lq, d_v)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, h, Lq)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: shapes only
        raise NotImplementedError


@contextlib.contextmanager
def fused_attention():
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the context (``saved_tensors_hooks``)."""

    def __init__(self):
        self.total = 0
        self._kept: dict[int, torch.Tensor] = {}  # held, so that no id is reused while counting (meta: no memory)

    def pack(self, t: torch.Tensor):
        if id(t) not in self._kept:  # the same tensor saved by two ops is stored once
            self._kept[id(t)] = t
            self.total += nbytes(t)
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class CheckpointCounter:
    """A ``gradient_checkpointing_func`` for the count: a checkpointed block keeps its inputs; its own activations
    exist only while it is recomputed (one block at a time), so their largest value is recorded."""

    def __init__(self):
        self.inputs = 0
        self.largest_block = 0

    def __call__(self, block, *args):
        self.inputs += sum(nbytes(a) for a in args if torch.is_tensor(a))
        with SavedBytes() as inner:
            out = block(*args)
        self.largest_block = max(self.largest_block, inner.total)
        return out


@dataclass(frozen=True)
class BackboneSpec:
    """What the estimate builds for one backbone: its frozen parts (name → a builder on meta; the first is the
    denoiser the LoRA targets) and one sample's denoiser inputs at a resolution."""

    label: str
    resolution: int
    parts: dict[str, Callable[[], torch.nn.Module]]
    inputs: Callable[[int], tuple[tuple, dict]]  # resolution → (args, kwargs) of the denoiser, bf16 on meta


def _meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _sd15_inputs(resolution: int):
    side = resolution // 8
    return (_meta(1, 4, side, side), torch.zeros(1, dtype=torch.long, device="meta")), {"encoder_hidden_states": _meta(1, 77, 768)}


def _sdxl_inputs(resolution: int):
    side = resolution // 8
    added = {"text_embeds": _meta(1, CLIP_G_TEXT_CONFIG["projection_dim"]), "time_ids": _meta(1, 6)}
    return (_meta(1, 4, side, side), torch.zeros(1, dtype=torch.long, device="meta")), {
        "encoder_hidden_states": _meta(1, 77, SDXL_UNET_CONFIG["cross_attention_dim"]), "added_cond_kwargs": added}


def _sd3_inputs(resolution: int):
    side, c = resolution // 8, SD3_MEDIUM_TRANSFORMER_CONFIG
    return (), {"hidden_states": _meta(1, c["in_channels"], side, side), "timestep": torch.zeros(1, device="meta"),
                "encoder_hidden_states": _meta(1, 77 + SD3_T5_TOKENS, c["joint_attention_dim"]),
                "pooled_projections": _meta(1, c["pooled_projection_dim"])}


BACKBONES: dict[str, BackboneSpec] = {
    "sd15": BackboneSpec("SD 1.5", 512, {
        "UNet": lambda: UNet2DConditionModel(**SD15_UNET_CONFIG),
        "VAE": lambda: AutoencoderKL(**SD15_VAE_CONFIG),
        "text encoder (CLIP ViT-L/14 text)": lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
    }, _sd15_inputs),
    "sdxl": BackboneSpec("SDXL 1.0", 1024, {
        "UNet": lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
        "VAE": lambda: AutoencoderKL(**{**SD15_VAE_CONFIG, "sample_size": 1024}),
        "text encoder (CLIP ViT-L/14 text)": lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        "text encoder 2 (OpenCLIP ViT-bigG/14 text)": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT_CONFIG)),
    }, _sdxl_inputs),
    "sd3": BackboneSpec("SD3 medium", 1024, {
        "MMDiT transformer": lambda: SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER_CONFIG),
        "VAE (16 channels)": lambda: AutoencoderKL(**SD3_VAE_CONFIG),
        "text encoder (CLIP ViT-L/14 text)": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        "text encoder 2 (OpenCLIP ViT-bigG/14 text)": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT_CONFIG)),
        "text encoder 3 (T5-XXL encoder)": lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)),
    }, _sd3_inputs),
}


def backbone_of(base_model: str) -> str:
    """The backbone key a preset's ``base_model`` names (hub id or folder name): SD3, SDXL, else SD 1.5."""
    name = base_model.lower()
    if "stable-diffusion-3" in name or "sd3" in name:
        return "sd3"
    if "xl" in name:
        return "sdxl"
    return "sd15"


def denoiser_activations(spec: BackboneSpec, hypernet_cfg: E2EConfig, resolution: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes saved for backward per sample, LoRA target layers) of one bf16 training forward of the backbone's
    denoiser with the hypernetwork's per-sample LoRA, on the meta device."""
    with torch.device("meta"):
        denoiser = next(iter(spec.parts.values()))().to(torch.bfloat16).requires_grad_(False)
    counter = CheckpointCounter()
    if checkpointing:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=counter)
    shapes = target_shapes(denoiser, hypernet_cfg.targets)
    r = hypernet_cfg.rank
    lora = LoRAWeights({name: LoRALayer(torch.empty(1, r, d_in, device="meta", dtype=torch.bfloat16, requires_grad=True),  # the
                                        torch.empty(1, d_out, r, device="meta", dtype=torch.bfloat16, requires_grad=True), float(r))  # hypernetwork's output
                        for name, (d_in, d_out) in shapes.items()})
    args, kwargs = spec.inputs(resolution)
    with fused_attention(), SavedBytes() as outer, LoRAInjector(denoiser).apply(lora, mode="per_sample"):
        denoiser(*args, **kwargs)
    saved = outer.total + (counter.inputs + counter.largest_block if checkpointing else 0)
    return saved, len(shapes)


def hypernet_parts(cfg: E2EConfig, target_shapes: dict) -> tuple[list[int], int]:
    """(element counts of the trained parameter tensors, bytes saved for backward per sample) of the hypernetwork
    without its frozen encoder: built on meta with a 1024-d token input (CLIP ViT-L/14's width), its decoder run on
    257 tokens."""
    with torch.device("meta"):
        net = E2EHyperNetwork(replace(cfg, encoder="world", encoder_dim=CLIP_L14_VISION_CONFIG["hidden_size"]), target_shapes)
    trained = [p.numel() for n, p in net.named_parameters() if not n.startswith("encoder.")]
    tokens = torch.empty(1, 1, 257, CLIP_L14_VISION_CONFIG["hidden_size"], device="meta")
    with fused_attention(), SavedBytes() as saved:
        net.decode(net.token_proj(tokens).mean(dim=1))
    return trained, saved.total


def moment_bytes(numels: list[int], optimizer: str) -> float:
    """Bytes of AdamW's two moments for trained tensors of these sizes: 8 a parameter (fp32), or bitsandbytes' 8-bit
    state (1 byte each + an fp32 absmax per block of 256) for tensors of at least ``min_8bit_size`` elements."""
    if optimizer == "adamw":
        return 8.0 * sum(numels)
    return sum(n * (2 + 2 * 4 / BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in numels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", "--config", dest="config", default=PRESET,
                        help="the training preset whose backbone and hypernetwork are counted")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), help="default: from the preset's base_model")
    parser.add_argument("--batch-per-gpu", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--resolution", type=int, help="default: the backbone's (512 for SD 1.5, 1024 for SDXL and SD3)")
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # casting a meta UNet to bf16 warns about modules kept in fp32: none here
    cfg = load_train_config(args.config)
    hyper: E2EConfig = cfg.hypernet
    spec = BACKBONES[args.backbone or backbone_of(cfg.base_model)]
    resolution = args.resolution or spec.resolution

    with torch.device("meta"):
        parts = {name: build() for name, build in spec.parts.items()}
        sizes = {name: count(module) for name, module in parts.items()}
        encoder = count(CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG)))
    targets = target_shapes(next(iter(parts.values())), hyper.targets)
    del parts
    numels, hyper_act = hypernet_parts(hyper, targets)
    trained = sum(numels)
    act = {ckpt: denoiser_activations(spec, hyper, resolution, ckpt)[0] + hyper_act for ckpt in (False, True)}

    frozen_bf16 = 2 * sum(sizes.values())
    encoder_fp32 = 4 * encoder
    ema = 4 if cfg.optim.ema_decay > 0 else 0
    moments = {name: moment_bytes(numels, name) for name in ("adamw", "adamw8bit")}

    def fixed(optimizer: str, gpus: int, mode: str = "ddp") -> float:
        """Bytes per GPU before activations: frozen weights + the trained parameters' state, as ``mode`` keeps it."""
        weights = grads = 4 * trained
        if mode == "ddp":
            return frozen_bf16 + encoder_fp32 + weights + grads + moments[optimizer] + ema * trained + (4 * trained if gpus > 1 else 0)
        if mode == "zero2":  # gradients and moments split G ways; weights, EMA replicated
            return frozen_bf16 + encoder_fp32 + weights + ema * trained + (grads + moments[optimizer]) / gpus
        # FSDP2, the personalizer one fp32 unit: its weights (trained, and the frozen image encoder), grads, moments, EMA
        # split G ways; while it computes, all of it gathered and the trained parameters' unsharded gradients (fp32)
        sharded = (encoder_fp32 + weights + grads + moments[optimizer] + ema * trained) / gpus
        return frozen_bf16 + sharded + 4 * (encoder + trained) + 4 * trained

    print(f"preset {args.config}: {spec.label} at {resolution}x{resolution}; rank {hyper.rank}, d_model {hyper.d_model}, "
          f"{hyper.layers} decoder layers, {len(targets)} LoRA target layers; mixed_precision {cfg.mixed_precision}; "
          f"optim.optimizer {cfg.optim.optimizer}; ema_decay {cfg.optim.ema_decay}")
    print("\nparameters (built from configs on the meta device)")
    for name, n in sizes.items():
        print(f"  {name:44s} {n / 1e6:8.1f} M")
    print(f"  {'frozen backbone, total':44s} {sum(sizes.values()) / 1e6:8.1f} M")
    print(f"  {'image encoder (CLIP ViT-L/14 vision)':44s} {encoder / 1e6:8.1f} M")
    print(f"  {'hypernetwork (trained)':44s} {trained / 1e6:8.1f} M  ({sum(n for n in numels if n >= BNB_MIN_8BIT_SIZE) / trained:.1%} "
          f"in tensors of >= {BNB_MIN_8BIT_SIZE} elements)")
    for name in ("adamw", "adamw8bit"):
        per = 8 + moments[name] / trained + ema
        print(f"\nfixed per GPU, {name}: frozen backbone bf16 {frozen_bf16 / GB:.2f} GB + CLIP vision fp32 {encoder_fp32 / GB:.2f} GB + "
              f"hypernetwork fp32 weights, grads, {name} moments{', EMA' if ema else ''} ({per:.2f} bytes a parameter) "
              f"{per * trained / GB:.2f} GB (+{4 * trained / GB:.2f} GB DDP buckets on >1 GPU)", end="")
    print(f"\nactivations per sample (bf16): {act[False] / GB:.2f} GB without gradient checkpointing, "
          f"{act[True] / GB:.2f} GB with it (hypernetwork decoder: {hyper_act / GB:.3f} GB)")

    print("\nestimated GB per GPU, DDP (weights + optimizer state + batch x activations; add ~1 GB for CUDA context and fragmentation)\n")
    print("| GPUs | batch per GPU | adamw, no checkpointing | adamw, checkpointing | adamw8bit, no checkpointing | adamw8bit, checkpointing |")
    print("|---:|---:|---:|---:|---:|---:|")
    for gpus in args.gpus:
        for b in args.batch_per_gpu:
            cells = [(fixed(o, gpus) + b * act[c]) / GB for o in ("adamw", "adamw8bit") for c in (False, True)]
            print(f"| {gpus} | {b} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")

    g = SHARDED_GPUS
    print(f"\nfixed GB per GPU on {g} GPUs by mode (add batch x activations as above)\n")
    print("| mode | adamw | adamw8bit |")
    print("|---|---:|---:|")
    for mode, label in (("ddp", "DDP (ddp.yaml)"), ("zero2", "ZeRO-2 (deepspeed_zero2.yaml)"), ("fsdp", "FSDP2, personalizer one unit (fsdp.yaml)")):
        eight = "refused" if mode == "fsdp" else f"{fixed('adamw8bit', g, mode) / GB:.2f}"  # the engine refuses 8-bit AdamW on shards
        print(f"| {label} | {fixed('adamw', g, mode) / GB:.2f} | {eight} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
