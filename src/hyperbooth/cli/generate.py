"""`hyperbooth generate`: prompts (+ reference images, a LoRA file or a mix of LoRA files) → a captioned image grid,
on the shipped world model or any backbone folder (:func:`hyperbooth.generate.generate`).

    hyperbooth generate --prompt "a sks toy in the snow" --images ref1.png ref2.png --out grid.png
    hyperbooth generate --model path/to/sd15 --hypernet runs/sd15/hypernet --images dog/ --prompt "a sks dog" --out dog.png
    hyperbooth generate --prompt "a sks toy" --mix a.safetensors:0.5 b.safetensors:0.5 --num-images 4 --out outs/
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from hyperbooth.backbones import as_components, load_backbone
from hyperbooth.devices import DTYPES, resolve_device
from hyperbooth.errors import ConfigError
from hyperbooth.files import check_writable
from hyperbooth.generate import check_finite, generate
from hyperbooth.grids import captioned_grid, to_uint8, write_pngs
from hyperbooth.images import image_files, load_image
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS, GUIDANCE, parse_interval
from hyperbooth.lora.io import load_lora
from hyperbooth.personalize import load_personalizer, mix_loras, parse_mix, personalize, personalizer_folder
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--hypernet``, ``--device``, ``--dtype``: shared by generate and personalize."""
    parser.add_argument("--model", default=None, help="backbone: a diffusers pipeline folder (SD 1.5 …) or hub id, or the world's model folder (default: the shipped world model)")
    parser.add_argument("--hypernet", type=Path, default=None, help="personalizer folder of any registered method (default: the shipped checkpoint of --method)")
    parser.add_argument("--method", default=None, help="the shipped checkpoint of this method (e2e, hyperdreambooth, hyperlora; default e2e), or the method --hypernet must hold")
    parser.add_argument("--iterations", type=int, default=None, help="hyperdreambooth: refinement steps K of the hypernetwork (default: its config's)")
    parser.add_argument("--fast-finetune-steps", type=int, default=None, help="hyperdreambooth: rank-relaxed fast fine-tune steps after the prediction (needs --class-name)")
    parser.add_argument("--base-lora-scale", type=float, default=None, help="hyperlora: the Base-LoRA's scale (default: its config's, 0.25; 0 leaves it out)")
    parser.add_argument("--class-name", default=None, help="the subject's class word, for methods that fine-tune (dreambooth-lora, hyperdreambooth's fast fine-tune)")
    parser.add_argument("--device", default="cpu", help="torch device of the backbone and hypernetwork (cpu, cuda, cuda:1, mps, auto)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the backbone (the sampler state stays float32)")


def inference_options(args: argparse.Namespace) -> dict:
    """The method's inference options given on the command line (``--iterations``, ``--fast-finetune-steps``)."""
    options = {"iterations": args.iterations, "fast_finetune_steps": args.fast_finetune_steps, "base_lora_scale": args.base_lora_scale}
    return {k: v for k, v in options.items() if v is not None}


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="prompts (+ reference images, a LoRA file or a mix) → a captioned image grid")
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (use the rare token, e.g. 'a sks toy in the snow')")
    subject = parser.add_mutually_exclusive_group()
    subject.add_argument("--images", nargs="+", help="reference images (files or folders) of one subject; the hypernetwork makes its LoRA")
    subject.add_argument("--lora", type=Path, help="a LoRA .safetensors file (diffusers or kohya layout)")
    subject.add_argument("--mix", nargs="+", metavar="FILE:W", help="interpolate LoRA files: Σ w_i ΔW_i, e.g. a.safetensors:0.5 b.safetensors:0.5 "
                         "(with --hypernet of the HyperLoRA that made them: Σ w_i c_i in its coefficient space)")
    parser.add_argument("--guidance", default=None, help=f"{' | '.join(GUIDANCE)} (default: hm-cfg with a subject, cfg without)")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="CFG scale (cfg, and the base model)")
    parser.add_argument("--w-base", type=float, default=DEFAULT_W_BASE, help="HM-CFG weight of the base model's text direction")
    parser.add_argument("--w-pers", type=float, default=DEFAULT_W_PERS, help="HM-CFG weight of the personalized model's direction")
    parser.add_argument("--pers-interval", default="{:g},{:g}".format(*DEFAULT_PERS_INTERVAL), metavar="LO,HI",
                        help="HM-CFG timestep schedule: the personalized branch runs for noise levels t/T in [LO, HI] (default 0,1: every step)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="ΔW → s·ΔW")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt, seeds SEED … SEED+N-1")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, help=f"{' | '.join(SCHEDULERS)} (default {DEFAULT_SCHEDULER})")
    add_model_options(parser)
    parser.add_argument("--out", required=True, help="grid.png, or a folder (existing, or ending in '/') for the images and grid.png")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per sampling run")
    parser.set_defaults(func=run)


def output_paths(out: str) -> tuple[Path | None, Path]:
    """``--out`` → (folder for the single images or None, the grid file). Checked before any work is done: the
    folder the files go into (or, for a new folder, the one it will be made in) must exist and be writable."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {out!r} exists and is not a folder")
        check_writable(path if path.is_dir() else path.parent, f"--out {out!r}")
        return path, path / "grid.png"
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out {out!r} must be a .png file or a folder (end it with '/')")
    check_writable(path.parent, f"--out {out!r}")
    return None, path


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    if args.guidance is not None and args.guidance not in GUIDANCE:
        raise ConfigError(f"unknown --guidance {args.guidance!r}; choose one of {', '.join(GUIDANCE)}")
    if args.guidance == "hm-cfg" and not (args.images or args.lora or args.mix):
        raise ConfigError("--guidance hm-cfg needs a subject (--images, --lora or --mix); use --guidance cfg for the base model")
    if args.hypernet is not None and not (args.images or args.mix):
        raise ConfigError(f"--hypernet {str(args.hypernet)!r} needs --images (the subject's reference images it reads), or --mix of its LoRA files")
    if (args.method is not None or inference_options(args)) and not (args.images or args.mix):
        raise ConfigError("--method, --iterations, --fast-finetune-steps and --base-lora-scale need --images (the subject's reference images)")
    args.pers_interval = parse_interval(args.pers_interval)
    if args.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    for name in ("guidance_scale", "w_base", "w_pers", "lora_scale"):
        check_finite("--" + name.replace("_", "-"), getattr(args, name))


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    folder, grid_path = output_paths(args.out)
    mix = parse_mix(args.mix) if args.mix else None
    device = resolve_device(args.device, "--device")
    files = image_files(args.images) if args.images else None
    for f in files or ():  # every file checked before a model loads
        load_image(f)
    personalizer = load_personalizer(args.hypernet, device=device, method=args.method, **inference_options(args)) if files else None
    backbone = load_backbone(args.model, device=device, dtype=DTYPES[args.dtype])
    weights, subject = None, "base model (CFG)"
    if personalizer is not None:
        personalizer.check_backbone(backbone, source=personalizer_folder(args.hypernet, args.method))  # before any work: the folder is named
        weights, ms = personalize(files, personalizer, backbone, args.class_name)
        subject = f"{len(files)} reference image(s), {personalizer.method} {ms:.1f} ms"
    elif args.lora:
        loaded = load_lora(args.lora, backbone.components)
        weights, subject = loaded.components, str(args.lora)
    elif mix:  # with --hypernet (a HyperLoRA): in its coefficient space, else in ΔW
        mixer = load_personalizer(args.hypernet, device=device, **inference_options(args)) if args.hypernet is not None else None
        weights, subject = mix_loras(mix, backbone.components, mixer), " + ".join(f"{w:g}·{p}" for p, w in mix)

    if weights is not None:
        weights = {c: w.to(device=device, dtype=DTYPES[args.dtype]) for c, w in as_components(weights).items()}
    seeds = list(range(args.seed, args.seed + args.num_images))
    t0 = time.perf_counter()
    images = {}  # seed → (P, 3, H, W); cell (prompt i, seed s) is row i of the run with seed s
    for s in seeds:
        images[s] = generate(
            backbone, args.prompt, weights, guidance=args.guidance, guidance_scale=args.guidance_scale, w_base=args.w_base,
            w_pers=args.w_pers, pers_interval=args.pers_interval, steps=args.steps, seed=s, scheduler=args.scheduler, lora_scale=args.lora_scale,
            progress=args.progress,
        )
    seconds = (time.perf_counter() - t0) / (len(seeds) * len(args.prompt))
    cells = [list(to_uint8(images[s])) for s in seeds]
    captions = [[f"{p}\nseed {s}" for p in args.prompt] for s in seeds]
    upscale = max(1, 128 // backbone.resolution)
    files = [(grid_path, captioned_grid(cells, captions, upscale=upscale))]
    if folder is not None:
        files = [(folder / f"{i:02d}_{_slug(prompt)}_seed{s}.png", image)
                 for s, row in zip(seeds, cells) for i, (prompt, image) in enumerate(zip(args.prompt, row))] + files
    write_pngs(files, folder)
    mode = "base model" if weights is None else (args.guidance or "hm-cfg")
    print(f"wrote {grid_path}: {len(args.prompt)} prompt(s) x {len(seeds)} seed(s), {mode}, {args.steps} {args.scheduler} steps, "
          f"{seconds:.2f} s per image; subject: {subject}")
    return 0
