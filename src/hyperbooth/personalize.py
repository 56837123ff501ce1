"""`hyperbooth personalize --images a.png [b.png …] --out subject.safetensors`: photos → a LoRA file, one pass."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from hyperbooth.errors import ConfigError

log = logging.getLogger(__name__)

SHIPPED_HYPERNET = Path(__file__).resolve().parent / "assets" / "world" / "e2e"


def register(subparsers) -> None:
    parser = subparsers.add_parser("personalize", help="reference images → a LoRA file (diffusers or kohya layout)")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    parser.add_argument("--hypernet", type=Path, default=None, help="hypernetwork folder (default: the shipped e2e one)")
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped world model)")
    parser.set_defaults(func=run)


def personalize(images: list, hypernet_path: Path | None = None, model_path: Path | None = None):
    """Images → (LoRAWeights for one subject, the base model, milliseconds the hypernetwork took)."""
    from hyperbooth.generate import load_hypernet
    from hyperbooth.images import image_files, load_image
    from hyperbooth.world.base_model import WorldBaseModel

    hypernet = load_hypernet(hypernet_path)  # a missing folder says how to train one
    base = WorldBaseModel.from_pretrained(model_path)
    refs = torch.stack([load_image(f, size=base.resolution) for f in image_files(images)])  # (k, 3, H, W)
    t0 = time.perf_counter()
    with torch.no_grad():
        weights = hypernet(refs[None])  # one subject from k references
    ms = (time.perf_counter() - t0) * 1e3
    return weights, base, ms


def run(args: argparse.Namespace) -> int:
    from hyperbooth.lora.io import save_lora

    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {str(args.out)!r}")
    weights, base, ms = personalize(args.images, args.hypernet, args.model)
    save_lora(args.out, weights, args.format, models={"unet": base.unet}, method="e2e", base_model=str(base.path.name))
    print(f"wrote {args.out} ({args.format} layout, {len(weights)} modules, rank {max(weights.ranks.values())}); hypernetwork pass {ms:.1f} ms")
    return 0
