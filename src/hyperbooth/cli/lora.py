"""`hyperbooth lora inspect|convert`: look inside a LoRA file, or rewrite it in the other layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyperbooth.lora.io import FORMATS, load_lora, save_lora

#: Header fields ``convert`` carries over besides the method and base model (see ``personalize.lora_provenance``).
PROVENANCE_KEYS = ("hyperbooth.backbone", "hyperbooth.hypernet", "hyperbooth.unet_layout")


def register(subparsers) -> None:
    parser = subparsers.add_parser("lora", help="inspect or convert LoRA files (diffusers/PEFT and kohya layouts)")
    sub = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    inspect = sub.add_parser("inspect", help="print a LoRA file's layout, components, ranks and header")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_inspect)

    convert = sub.add_parser("convert", help="rewrite a LoRA file in another layout (same ΔW)")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--format", choices=FORMATS, required=True)
    convert.set_defaults(func=_convert)


def _summary(path: Path) -> dict:
    lora = load_lora(path)
    comps = {}
    for comp, w in lora.components.items():
        ranks = sorted(set(w.ranks.values()))
        comps[comp] = {"modules": len(w), "ranks": ranks, "alphas": sorted({layer.alpha for layer in w.values()})}
    header = {k: v for k, v in lora.metadata.items() if k.startswith("hyperbooth.") and k != "hyperbooth.targets"}
    return {"path": str(path), "format": lora.format, "components": comps, "header": header}


def _inspect(args: argparse.Namespace) -> int:
    info = _summary(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']} layout")
    for comp, c in info["components"].items():
        print(f"  {comp}: {c['modules']} modules, rank {c['ranks']}, alpha {c['alphas']}")
    for key, value in info["header"].items():
        print(f"  {key} = {value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    lora = load_lora(args.src)
    meta = lora.metadata
    provenance = {k: v for k, v in meta.items() if k in PROVENANCE_KEYS}  # what made the file travels with it
    save_lora(
        args.dst,
        lora.components,
        args.format,
        conv_modules=lora.conv_modules,
        method=meta.get("hyperbooth.method", "unknown"),
        base_model=meta.get("hyperbooth.base_model", "unknown"),
        extra_metadata=provenance,
    )
    print(f"wrote {args.dst} ({args.format} layout)")
    return 0
