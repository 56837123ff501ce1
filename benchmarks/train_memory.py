"""Training memory per GPU for an e2e hypernetwork on Stable Diffusion 1.5 at 512x512 — an estimate, made without a
GPU and without weights.

Every model is built from its configuration on PyTorch's ``meta`` device (shapes only, no memory, nothing
downloaded): SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, the CLIP ViT-L/14 vision tower
(openai/clip-vit-large-patch14, the hypernetwork's frozen image encoder) and the hypernetwork the preset
``configs/e2e_sd15.yaml`` builds. Two things are counted:

- **weights and optimizer state**: parameters × bytes. Frozen backbone in bf16 (``mixed_precision: bf16`` loads it so),
  the frozen CLIP vision tower in fp32 (loaded as stored), the hypernetwork's trained parameters in fp32 with their
  gradients and AdamW's two moments (16 bytes a parameter), plus 4 for EMA when ``optim.ema_decay > 0`` and 4 for
  DDP's gradient buckets on more than one GPU;
- **activations per sample**: one training forward pass of the UNet (64x64 latents, 77 text tokens, the per-sample
  LoRA of the hypernetwork in its attention projections, bf16) and of the hypernetwork's decoder runs on meta
  tensors, and every tensor autograd saves for the backward pass is summed (``torch.autograd.graph.
  saved_tensors_hooks``). Attention is counted as the fused kernels (flash / memory-efficient SDPA, what PyTorch 2
  uses on a GPU) keep it: q, k, v, the output and a per-row log-sum-exp, not the L×L probabilities. With
  gradient checkpointing (``gradient_checkpointing: true``) the checkpointed blocks keep only their inputs, and one
  block at a time is recomputed in the backward pass: saved = outside the blocks + the blocks' inputs + the
  largest block's own activations. The hypernetwork's decoder is counted in fp32 (on meta there is no autocast):
  an upper bound for that part.

Not counted: the CUDA context and allocator fragmentation (~0.5–1 GB), the transient working memory of single ops,
the frozen VAE encoder and encoders' no-grad passes (freed as they go; a few hundred MB at 512x512). So the figures
are a floor to plan with, not a measurement.

    python benchmarks/train_memory.py [--batch-per-gpu 1 4 8] [--gpus 1 8]
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import replace

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from hyperbooth.lora.inject import LoRAInjector, target_shapes
from hyperbooth.lora.weights import LoRALayer, LoRAWeights
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.tiny import SD15_UNET_CONFIG
from hyperbooth.train.engine import load_train_config

#: SD 1.5's VAE (runwayml/stable-diffusion-v1-5, vae/config.json)
SD15_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                   "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                   "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512}
#: SD 1.5's text encoder, CLIP ViT-L/14's text tower (text_encoder/config.json)
SD15_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
#: openai/clip-vit-large-patch14's vision tower
CLIP_L14_VISION_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "image_size": 224, "patch_size": 14, "projection_dim": 768}
PRESET = "configs/e2e_sd15.yaml"
GB = 1024**3


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


def unet_activations(hypernet_cfg: E2EConfig, resolution: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes saved for backward per sample, LoRA target layers) of one bf16 training forward of SD 1.5's UNet
    with the hypernetwork's per-sample LoRA, on the meta device."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(torch.bfloat16).requires_grad_(False)
    counter = CheckpointCounter()
    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=counter)
    shapes = target_shapes(unet, hypernet_cfg.targets)
    r = hypernet_cfg.rank
    lora = LoRAWeights({name: LoRALayer(torch.empty(1, r, d_in, device="meta", dtype=torch.bfloat16, requires_grad=True),  # the
                                        torch.empty(1, d_out, r, device="meta", dtype=torch.bfloat16, requires_grad=True), float(r))  # hypernetwork's output
                        for name, (d_in, d_out) in shapes.items()})
    side = resolution // 8
    x = torch.empty(1, 4, side, side, device="meta", dtype=torch.bfloat16)
    cond = torch.empty(1, 77, 768, device="meta", dtype=torch.bfloat16)
    with fused_attention(), SavedBytes() as outer, LoRAInjector(unet).apply(lora, mode="per_sample"):
        unet(x, torch.zeros(1, dtype=torch.long, device="meta"), encoder_hidden_states=cond)
    saved = outer.total + (counter.inputs + counter.largest_block if checkpointing else 0)
    return saved, len(shapes)


def hypernet_parts(cfg: E2EConfig, target_shapes: dict) -> tuple[int, int]:
    """(trained parameters, bytes saved for backward per sample) of the hypernetwork without its frozen encoder:
    built on meta with a 1024-d token input (CLIP ViT-L/14's width), its decoder run on 257 tokens."""
    with torch.device("meta"):
        net = E2EHyperNetwork(replace(cfg, encoder="world", encoder_dim=CLIP_L14_VISION_CONFIG["hidden_size"]), target_shapes)
    trained = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("encoder."))
    tokens = torch.empty(1, 1, 257, CLIP_L14_VISION_CONFIG["hidden_size"], device="meta")
    with fused_attention(), SavedBytes() as saved:
        net.decode(net.token_proj(tokens).mean(dim=1))
    return trained, saved.total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=PRESET, help="the training preset whose hypernetwork is counted")
    parser.add_argument("--batch-per-gpu", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # casting a meta UNet to bf16 warns about modules kept in fp32: none here
    cfg = load_train_config(args.config)
    hyper: E2EConfig = cfg.hypernet

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        sizes = {"UNet": count(unet), "VAE": count(AutoencoderKL(**SD15_VAE_CONFIG)),
                 "text encoder (CLIP ViT-L/14 text)": count(CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))),
                 "image encoder (CLIP ViT-L/14 vision)": count(CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG)))}
    targets = target_shapes(unet, hyper.targets)
    trained, hyper_act = hypernet_parts(hyper, targets)
    act = {ckpt: unet_activations(hyper, args.resolution, ckpt)[0] + hyper_act for ckpt in (False, True)}

    frozen_bf16 = 2 * (sizes["UNet"] + sizes["VAE"] + sizes["text encoder (CLIP ViT-L/14 text)"])
    encoder_fp32 = 4 * sizes["image encoder (CLIP ViT-L/14 vision)"]
    per_param = 16 + (4 if cfg.optim.ema_decay > 0 else 0)
    print(f"preset {args.config}: rank {hyper.rank}, d_model {hyper.d_model}, {hyper.layers} decoder layers, "
          f"{len(targets)} LoRA target layers; resolution {args.resolution}; mixed_precision {cfg.mixed_precision}")
    print("\nparameters (built from configs on the meta device)")
    for name in ("UNet", "VAE", "text encoder (CLIP ViT-L/14 text)", "image encoder (CLIP ViT-L/14 vision)"):
        print(f"  {name:38s} {sizes[name] / 1e6:8.1f} M")
    print(f"  {'hypernetwork (trained)':38s} {trained / 1e6:8.1f} M")
    print(f"\nfixed per GPU: frozen backbone bf16 {frozen_bf16 / GB:.2f} GB + CLIP vision fp32 {encoder_fp32 / GB:.2f} GB + "
          f"hypernetwork fp32 weights, grads, AdamW{', EMA' if per_param > 16 else ''} {per_param * trained / GB:.2f} GB "
          f"(+{4 * trained / GB:.2f} GB DDP buckets on >1 GPU)")
    print(f"activations per sample (bf16): {act[False] / GB:.2f} GB without gradient checkpointing, "
          f"{act[True] / GB:.2f} GB with it (hypernetwork decoder: {hyper_act / GB:.3f} GB)")
    print("\nestimated GB per GPU (weights + optimizer state + batch x activations; add ~1 GB for CUDA context and fragmentation)")
    print(f"  {'gpus':>4s} {'batch/GPU':>9s} {'no checkpointing':>17s} {'checkpointing':>14s}")
    for gpus in args.gpus:
        fixed = frozen_bf16 + encoder_fp32 + per_param * trained + (4 * trained if gpus > 1 else 0)
        for b in args.batch_per_gpu:
            print(f"  {gpus:4d} {b:9d} {(fixed + b * act[False]) / GB:17.1f} {(fixed + b * act[True]) / GB:14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
