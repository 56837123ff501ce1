"""`hyperbooth import-hyperlora SRC --image-encoder CLIP --out FOLDER`: a released HyperLoRA SDXL model folder
(``bytedance-research/HyperLoRA``: ``sdxl_hyper_id_lora_v1_fidelity`` or ``_edit``, the ComfyUI nodes' layout) → a
hyperbooth personalizer folder (method ``hyperlora-released``), which ``personalize`` and ``generate`` then take as
``--hypernet FOLDER`` like any other::

    hyperbooth import-hyperlora models/hyper_lora/sdxl_hyper_id_lora_v1_fidelity \\
        --image-encoder models/clip-vit-large-patch14 --out runs/hyperlora_released
    hyperbooth personalize --hypernet runs/hyperlora_released --model models/sdxl --images face.jpg --out face.safetensors

The conversion is checked key by key (see :mod:`hyperbooth.methods.hyperlora_import`); ``--model`` also checks the
targets against a backbone's UNet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.files import check_writable
from hyperbooth.methods.hyperlora_import import FACE_ENCODERS, import_released_hyperlora

SAVE_DTYPES = ("float16", "float32")


def register(subparsers) -> None:
    parser = subparsers.add_parser("import-hyperlora", help="convert a released HyperLoRA SDXL model folder into a hyperbooth personalizer folder")
    parser.add_argument("src", type=Path, help="the released model folder (hyper_lora_modules.json, *.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the hyperbooth personalizer folder to write")
    parser.add_argument("--image-encoder", required=True, help="the CLIP ViT-L/14 vision model folder (openai/clip-vit-large-patch14), recorded by path")
    parser.add_argument("--face-encoder", default="none", help=f"{' | '.join(FACE_ENCODERS)}[:ROOT] (none: the ArcFace ID path is skipped, with a warning)")
    parser.add_argument("--model", default=None, help="a backbone folder whose UNet the targets are checked against (optional)")
    parser.add_argument("--heads", type=int, default=None, help="the resampler's attention heads (the files cannot tell; released: 12)")
    parser.add_argument("--layers-per-block", type=int, default=2, help="UNet resnets per level, to read LDM-style module names (SDXL: 2)")
    parser.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float16", help="dtype of the written weights (the released files are float16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    check_writable(args.out.parent if args.out.parent != Path("") else Path("."), f"--out {str(args.out)!r}")
    encoder = Path(args.image_encoder)
    encoder = str(encoder.resolve()) if encoder.exists() else args.image_encoder  # a folder by absolute path; else as given
    unet = None
    if args.model is not None:
        from hyperbooth.backbones import load_backbone

        unet = load_backbone(args.model).unet
    overrides = {"heads": args.heads} if args.heads is not None else {}
    model = import_released_hyperlora(args.src, image_encoder=encoder, face_encoder=args.face_encoder, unet=unet,
                                      layers_per_block=args.layers_per_block, **overrides)
    dtype = torch.float16 if args.save_dtype == "float16" else None
    model.save_pretrained(args.out, extra={"imported_from": str(Path(args.src).resolve())}, dtype=dtype)
    cfg = model.config
    print(f"wrote {args.out} (hyperlora-released: {len(model.names) // 4} attention modules, {len(model.names)} targets, rank {cfg.rank}, "
          f"K={cfg.num_basis}, ID path {'on' if cfg.id_path and cfg.face_encoder != 'none' else 'skipped' if cfg.id_path else 'absent'}); "
          f"use it with `hyperbooth personalize --hypernet {args.out} --model SDXL_FOLDER --images …`")
    return 0
