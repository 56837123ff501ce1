"""`hyperbooth personalize --images a.png [b.png …] --out subject.safetensors`: photos → a LoRA file, through any
registered method (the shipped e2e hypernetwork by default, or ``--hypernet FOLDER``), for any backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.backbones import load_backbone
from hyperbooth.cli.generate import add_model_options
from hyperbooth.devices import DTYPES, resolve_device
from hyperbooth.errors import ConfigError
from hyperbooth.files import check_writable
from hyperbooth.images import image_files, load_image
from hyperbooth.lora.io import FORMATS, save_lora
from hyperbooth.personalize import load_personalizer, lora_provenance, personalize


def register(subparsers) -> None:
    parser = subparsers.add_parser("personalize", help="reference images → a LoRA file (diffusers or kohya layout)")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--format", choices=FORMATS, default="diffusers")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {str(args.out)!r}")
    if args.out.is_dir():
        raise ConfigError(f"--out {str(args.out)!r} is a folder")
    check_writable(args.out.parent, f"--out {str(args.out)!r}")
    for f in image_files(args.images):  # a bad file is named before any model loads
        load_image(f)
    device = resolve_device(args.device, "--device")
    personalizer = load_personalizer(args.hypernet, device=device)
    backbone = load_backbone(args.model, device=device, dtype=DTYPES[args.dtype])
    weights, ms = personalize(args.images, personalizer, backbone, args.class_name)
    save_lora(args.out, weights.select(0), args.format, models=backbone.components, **lora_provenance(personalizer, backbone, args.hypernet))
    print(f"wrote {args.out} ({args.format} layout, {personalizer.method}, {len(weights)} modules, rank {max(weights.ranks.values())}); "
          f"personalization {ms:.1f} ms")
    return 0
