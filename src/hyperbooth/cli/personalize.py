"""`hyperbooth personalize --images a.png [b.png …] --out subject.safetensors`: photos → a LoRA file, through any
registered method (the shipped e2e hypernetwork by default, or ``--hypernet FOLDER``), for any backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.backbones import as_components, load_backbone
from hyperbooth.cli.generate import add_model_options, inference_options
from hyperbooth.devices import DTYPES, resolve_device
from hyperbooth.errors import ConfigError
from hyperbooth.files import check_writable
from hyperbooth.images import image_files, load_image
from hyperbooth.lora.io import FORMATS, save_lora
from hyperbooth.personalize import load_personalizer, lora_provenance, personalize, personalizer_folder


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
    folder = personalizer_folder(args.hypernet, args.method)
    personalizer = load_personalizer(folder, device=device, **inference_options(args))
    backbone = load_backbone(args.model, device=device, dtype=DTYPES[args.dtype])
    personalizer.check_backbone(backbone, source=folder)  # one built for another backbone: the folder is named
    weights, ms = personalize(args.images, personalizer, backbone, args.class_name)
    parts = {comp: w.select(0) for comp, w in as_components(weights).items()}
    save_lora(args.out, parts, args.format, models=backbone.components, **lora_provenance(personalizer, backbone, folder))
    modules = ", ".join(f"{comp}: {len(w)} modules" for comp, w in parts.items())
    rank = max(r for w in parts.values() for r in w.ranks.values())
    print(f"wrote {args.out} ({args.format} layout, {personalizer.method}, {modules}, rank {rank}); personalization {ms:.1f} ms")
    return 0
