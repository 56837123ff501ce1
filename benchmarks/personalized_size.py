"""What one personalized subject weighs: HyperDreamBooth's LiDB variables against a rank-4 LoRA of the same target
layers and against the whole UNet (what DreamBooth fine-tunes), for SD 1.5 (built from its config on the ``meta``
device: shapes only) and the world's shipped base model. The paper's figures: ~30 k variables, ~120 KB, 10,000x
smaller than DreamBooth.

    python benchmarks/personalized_size.py [--rank 1 --a 100 --b 50]
"""

from __future__ import annotations

import argparse
import sys

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.lora.inject import target_shapes
from hyperbooth.methods.lidb import num_variables
from hyperbooth.tiny import SD15_UNET_CONFIG

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_memory import SD15_TEXT_CONFIG  # noqa: E402

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def lora_numbers(shapes: dict, rank: int) -> int:
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--a", type=int, default=100)
    parser.add_argument("--b", type=int, default=50)
    args = parser.parse_args(argv)
    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    world = WorldBackbone.from_pretrained(None).unet
    print(f"LiDB r={args.rank}, a={args.a}, b={args.b}; sizes in fp32 (4 bytes a number)\n")
    print("| backbone | targets | layers | LiDB variables | LiDB size | rank-4 LoRA numbers | × LiDB | UNet parameters | × LiDB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    cases = [("SD 1.5", "attention q/k/v/out", target_shapes(sd, ATTENTION), sd),
             ("SD 1.5", "attention + CLIP text q/k/v/out", {**target_shapes(sd, ATTENTION), **{"te." + k: v for k, v in target_shapes(text, ("q_proj", "k_proj", "v_proj", "out_proj")).items()}}, sd),
             ("world", "attention q/k/v/out", target_shapes(world, ATTENTION), world)]
    for name, what, shapes, unet in cases:
        lidb = num_variables(shapes, args.rank, args.a, args.b)
        lora = lora_numbers(shapes, 4)
        params = sum(p.numel() for p in unet.parameters())
        print(f"| {name} | {what} | {len(shapes)} | {lidb:,} | {lidb * 4 / 1024:.0f} KB | {lora:,} | {lora / lidb:.0f}× | {params:,} | {params / lidb:,.0f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
