"""`hyperbooth finetune`: reference images → a LoRA file by DreamBooth-LoRA fine-tuning (the baseline;
:mod:`hyperbooth.methods.dreambooth_lora`), on any backbone.

    hyperbooth finetune --images a.png b.png c.png --class-name toy --out subject.safetensors
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from hyperbooth.backbones import load_backbone
from hyperbooth.errors import ConfigError
from hyperbooth.images import image_files, load_image
from hyperbooth.lora.io import save_lora
from hyperbooth.methods.dreambooth_lora import METHOD, FinetuneConfig, finetune
from hyperbooth.prompts import instance_prompt


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="reference images → a LoRA file by DreamBooth-LoRA fine-tuning (the baseline)")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders of images of one subject")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--class-name", required=True, help="the subject's class word, e.g. toy (prompt 'a sks <class>')")
    parser.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    parser.add_argument("--model", default=None, help="backbone folder: a diffusers pipeline (SD 1.5 …) or the world's model (default: the shipped world model)")
    d = FinetuneConfig()
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--token", default=d.token, help="the rare token that names the subject")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--prior-preservation", action="store_true", help="add the class-prior loss on generated class images")
    parser.add_argument("--prior-weight", type=float, default=d.prior_weight)
    parser.add_argument("--num-class-images", type=int, default=d.num_class_images)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {str(out)!r}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder")
    cfg = FinetuneConfig(steps=args.steps, rank=args.rank, lr=args.lr, batch_size=args.batch_size, token=args.token,
                         flip_p=0.0 if args.no_flip else FinetuneConfig.flip_p, prior_preservation=args.prior_preservation,
                         prior_weight=args.prior_weight, num_class_images=args.num_class_images, seed=args.seed)
    try:
        cfg.validate()
    except ConfigError as e:  # name the option as typed: "--num-class-images=0 must be …"
        key, _, rest = str(e).partition("=")
        raise ConfigError(f"--{key.replace('_', '-')}={rest}") from None
    if not args.class_name.strip():
        raise ConfigError(f"--class-name {args.class_name!r} must be a non-empty word")
    files = image_files(args.images)
    for f in files:  # fail on a bad file before loading the model
        load_image(f)
    base = load_backbone(args.model)
    images = torch.stack([load_image(f, size=base.resolution) for f in files])  # (k, 3, H, W)
    torch.manual_seed(cfg.seed)
    weights, stats = finetune(base, images, args.class_name, cfg, progress=True)
    meta = {
        "hyperbooth.finetune_config": json.dumps(asdict(cfg)),
        "hyperbooth.instance_prompt": instance_prompt(args.class_name, cfg.token),
        "hyperbooth.finetune_seconds": f"{stats.seconds:.4f}",
        "hyperbooth.backbone": base.name,
    }
    save_lora(out, weights, args.format, models={base.denoiser: base.unet}, method=METHOD, base_model=str(base.path.name), extra_metadata=meta)
    print(f"wrote {out} ({args.format} layout, {len(weights)} modules, rank {cfg.rank}); {cfg.steps} steps on "
          f"{len(files)} image(s) in {stats.seconds:.1f} s; prompt: {instance_prompt(args.class_name, cfg.token)!r}")
    return 0
