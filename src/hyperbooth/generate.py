"""Generation with personalized LoRAs: CFG of the personalized model, or Hybrid-Model CFG, each step in ONE UNet call,
and the `hyperbooth generate` command.

Batch layout of a step for N prompts (per-sample LoRA rows; -1 = the frozen base model):

- ``"cfg"``:    ``[P(∅) × N ; P(c) × N]``                 rows ``[0..N-1, 0..N-1]`` (merged weights for one subject)
- ``"hm-cfg"``: ``[B(∅) × N ; B(c) × N ; P(c) × N]``      rows ``[-1 × 2N, 0..N-1]``

and the rule of :mod:`hyperbooth.guidance` combines the branches. A LoRA of one subject serves every prompt.

    hyperbooth generate --prompt "a sks toy in the snow" --images ref1.png ref2.png --out grid.png
    hyperbooth generate --prompt "a sks toy" --mix a.safetensors:0.5 b.safetensors:0.5 --num-images 4 --out outs/
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from hyperbooth.errors import CheckpointError, ConfigError, LoRAFileError
from hyperbooth.files import atomic_write_all, check_writable
from hyperbooth.guidance import DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS, cfg, check_interval, hm_cfg, parse_interval, pers_active
from hyperbooth.lora.inject import LoRAInjector, check_compatible
from hyperbooth.lora.weights import LoRAWeights, combine
from hyperbooth.sampling import DEFAULT_SCHEDULER, SCHEDULERS, denoise, make_scheduler

log = logging.getLogger(__name__)

GUIDANCE = ("cfg", "hm-cfg")
#: Defaults of the CLI, the demo and :func:`generate`; set from the measured HM-CFG sweep.
DEFAULT_GUIDANCE = "hm-cfg"
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_STEPS = 25
UPSCALE = 4  # grid cells: 32x32 images → 128x128, nearest neighbour


def _check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@torch.no_grad()
def generate(
    base,
    prompts: list[str],
    weights: LoRAWeights | None = None,
    guidance: str = DEFAULT_GUIDANCE,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    w_base: float = DEFAULT_W_BASE,
    w_pers: float = DEFAULT_W_PERS,
    pers_interval: tuple[float, float] = DEFAULT_PERS_INTERVAL,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    scheduler: str = DEFAULT_SCHEDULER,
    lora_scale: float = 1.0,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One image per prompt; ``(N, 3, H, W)`` float32 on the CPU in [-1, 1].

    ``weights``: one subject for every prompt, or N subjects (prompt ``i`` with subject ``i``); ``None`` samples the
    base model with CFG. ``guidance_scale`` is CFG's scale; ``w_base``/``w_pers`` are HM-CFG's, and ``pers_interval``
    its timestep schedule (:func:`~hyperbooth.guidance.pers_active`: outside it a step runs the base rows alone,
    with ``w_pers = 0``). The UNet runs on its
    own device and dtype; the initial noise is drawn on the CPU from ``seed``, so one seed gives one image.
    ``callback(i, t, x_t)`` runs after every step; ``progress`` shows a bar.
    """
    if guidance not in GUIDANCE:
        raise ConfigError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE)}")
    for name, value in (("guidance_scale", guidance_scale), ("w_base", w_base), ("w_pers", w_pers), ("lora_scale", lora_scale)):
        _check_finite(name, value)
    pers_interval = check_interval(pers_interval)
    if pers_interval != DEFAULT_PERS_INTERVAL and (guidance != "hm-cfg" or weights is None):
        log.warning("pers_interval=%s only applies to HM-CFG with a LoRA; ignored for guidance=%r", pers_interval, guidance)
    n = len(prompts)
    if n == 0:
        raise ConfigError("no prompts given")
    unet = base.unet
    k = weights.num_subjects if weights is not None else 0
    if weights is not None and k not in (1, n):
        raise ConfigError(f"{n} prompts but the LoRA holds {k} subjects (give one subject or one per prompt)")
    if weights is None:
        branches, rows, mode = 2, None, None
    elif guidance == "cfg":
        branches, rows, mode = 2, None, ("merged" if k == 1 else "per_sample")
    else:
        branches, mode = 3, "per_sample"
        subject = torch.zeros(n, dtype=torch.long) if k == 1 else torch.arange(n)
        rows = torch.cat([torch.full((2 * n,), -1), subject])  # (3N,)
    states, mask = base.encode(["" for _ in prompts] + list(prompts) * (branches - 1))  # (branches·N, L, d)
    dtype = unet.dtype
    states = states.to(dtype)

    sampler = make_scheduler(scheduler, base.scheduler)
    num_train_timesteps = sampler.config.num_train_timesteps
    injector = LoRAInjector(unet)
    scheduled = branches == 3 and pers_interval != DEFAULT_PERS_INTERVAL  # else no per-step check (nor device sync)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # HM-CFG outside its timestep interval: w_pers = 0, so only the 2N base rows run, with the LoRA switched off
        base_only = scheduled and not pers_active(t[0], num_train_timesteps, pers_interval)
        b = 2 if base_only else branches
        x_in = x_t.to(dtype).repeat(b, 1, 1, 1)  # (b·N, C, H, W) in the UNet's dtype
        with injector.disabled() if base_only else nullcontext():
            pred = unet(x_in, t.repeat(b), encoder_hidden_states=states[: b * n], encoder_attention_mask=None if mask is None else mask[: b * n]).sample
        parts = pred.to(x_t.dtype).chunk(b)
        if base_only:
            return cfg(parts[0], parts[1], w_base)
        if branches == 2:
            return cfg(parts[0], parts[1], guidance_scale)
        return hm_cfg(parts[0], parts[1], parts[2], w_base, w_pers)

    shape = (n, unet.config.in_channels, base.resolution, base.resolution)
    generator = torch.Generator().manual_seed(seed)
    lora = nullcontext() if weights is None else injector.apply(weights, mode=mode, rows=rows, scale=lora_scale)
    with lora:  # x_t stays float32; the UNet runs in its own dtype
        x = denoise(model_fn, sampler, shape, steps, generator=generator, device=unet.device, callback=callback, progress=progress)
    return x.float().clamp(-1, 1).cpu()


# -- subjects: reference images, a LoRA file, or a mix of LoRA files ---------------------------------------------


def load_hypernet(path: str | os.PathLike | None = None):
    """The e2e hypernetwork in ``path`` (default: the shipped one); a missing one says how to train it."""
    from hyperbooth.methods.e2e import CONFIG_NAME, E2EHyperNetwork
    from hyperbooth.personalize import SHIPPED_HYPERNET

    path = Path(path) if path is not None else SHIPPED_HYPERNET
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"hypernetwork {path / CONFIG_NAME} does not exist; train one with `hyperbooth train --config configs/e2e_world.yaml`")
    return E2EHyperNetwork.from_pretrained(path)


@torch.no_grad()
def personalize_refs(hypernet, base, refs: torch.Tensor) -> tuple[LoRAWeights, float]:
    """References ``(N, k, 3, H, W)`` → (LoRAWeights for N subjects, milliseconds of the hypernetwork pass)."""
    t0 = time.perf_counter()
    weights = hypernet(refs)
    ms = (time.perf_counter() - t0) * 1e3
    try:
        check_compatible(base.unet, weights, source="hypernetwork output")
    except LoRAFileError as e:
        raise CheckpointError(f"the hypernetwork was trained for another base model than {base.path} ({e})") from None
    return weights, ms


def parse_mix(specs: Sequence[str]) -> list[tuple[Path, float]]:
    """``["a.safetensors:0.5", …]`` → ``[(Path("a.safetensors"), 0.5), …]``; a bad spec is named."""
    out = []
    for spec in specs:
        path, sep, weight = spec.rpartition(":")
        try:
            value = float(weight) if sep and path else float("nan")
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise ConfigError(f"--mix {spec!r}: expected FILE:WEIGHT with a finite number as weight, e.g. a.safetensors:0.5")
        out.append((Path(path), value))
    return out


def mix_loras(files: Sequence[tuple[Path, float]], unet) -> LoRAWeights:
    """``Σ_i w_i · ΔW_i`` of LoRA files, exact in ΔW space (:func:`~hyperbooth.lora.weights.combine`)."""
    from hyperbooth.lora.io import load_lora

    loras = [load_lora(path, unet).unet for path, _ in files]
    for (path, _), lora in zip(files[1:], loras[1:]):
        if set(lora) != set(loras[0]):
            odd = sorted(set(lora) ^ set(loras[0]))[0]
            raise LoRAFileError(f"{path} and {files[0][0]} target different modules (first difference: {odd!r}); they cannot be mixed")
    return combine(loras, [w for _, w in files])


# -- grids -------------------------------------------------------------------------------------------------------


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; ``\\n`` starts a new line; over-long words are cut."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # a word wider than the cell
                cut = max(i for i in range(1, len(line) + 1) if font.getlength(line[:i]) <= width or i == 1)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def captioned_grid(
    cells: list[list[np.ndarray | None]],
    captions: list[list[str]],
    titles: Sequence[str] | None = None,
    upscale: int = UPSCALE,
    pad: int = 4,
):
    """Rows of ``(H, W, 3)`` uint8 images (``None`` = blank) → one PIL image: each cell upscaled ``upscale``x
    (nearest) with its caption under it, and optional column ``titles`` above; PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = next(c for row in cells for c in row if c is not None).shape[:2]
    cw, ch = w * upscale, h * upscale
    line_h = font.getbbox("Ag")[3] + 2
    cols = max(len(row) for row in cells)
    title_lines = [_wrap(t, font, cw) if t else [] for t in titles or []]
    title_h = max((len(lines) for lines in title_lines), default=0) * line_h
    caption_lines = [[_wrap(c, font, cw) if c else [] for c in row] for row in captions]
    row_h = [ch + max((len(lines) for lines in row), default=0) * line_h for row in caption_lines]
    canvas = Image.new("RGB", (pad + cols * (cw + pad), pad + title_h + (pad if title_h else 0) + sum(r + pad for r in row_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(title_lines):
        draw.multiline_text((pad + j * (cw + pad), pad), "\n".join(lines), fill="black", font=font, spacing=2)
    y = pad + title_h + (pad if title_h else 0)
    for row, lines_row, height in zip(cells, caption_lines, row_h):
        for j, cell in enumerate(row):
            x = pad + j * (cw + pad)
            if cell is not None:
                canvas.paste(Image.fromarray(cell).resize((cw, ch), Image.NEAREST), (x, y))
            if j < len(lines_row) and lines_row[j]:
                draw.multiline_text((x, y + ch + 1), "\n".join(lines_row[j]), fill="black", font=font, spacing=2)
        y += height + pad
    return canvas


def save_png(image, path: str | os.PathLike) -> Path:
    """Write a PIL image (or ``(H, W, 3)`` uint8 array) as PNG, atomically."""
    write_pngs([(Path(path), image)])
    return Path(path)


def write_pngs(files: Sequence[tuple[Path, object]], folder: Path | None = None) -> None:
    """Write ``(path, image)`` PNGs (PIL images or ``(H, W, 3)`` uint8 arrays) all or none
    (:func:`atomic_write_all`); ``folder``, made if missing, is removed again when the writes fail."""
    from PIL import Image

    def writer(image):
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        return lambda tmp: image.save(tmp, format="PNG")

    if not files:
        return
    made = folder is not None and not folder.is_dir()
    try:
        if made:
            folder.mkdir()
        atomic_write_all([(path, writer(image)) for path, image in files])
    except BaseException as e:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if isinstance(e, OSError) and e.errno is not None:  # the file system's refusal (full, read-only, ...), not a bug
            raise ConfigError(f"cannot write the images into {str(folder or files[0][0].parent)!r}: {e.strerror or e}") from None
        raise


# -- CLI ---------------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="prompts (+ reference images, a LoRA file or a mix) → a captioned image grid")
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (use the rare token, e.g. 'a sks toy in the snow')")
    subject = parser.add_mutually_exclusive_group()
    subject.add_argument("--images", nargs="+", help="reference images (files or folders) of one subject; the hypernetwork makes its LoRA")
    subject.add_argument("--lora", type=Path, help="a LoRA .safetensors file (diffusers or kohya layout)")
    subject.add_argument("--mix", nargs="+", metavar="FILE:W", help="interpolate LoRA files: Σ w_i ΔW_i, e.g. a.safetensors:0.5 b.safetensors:0.5")
    parser.add_argument("--guidance", default=DEFAULT_GUIDANCE, help=f"{' | '.join(GUIDANCE)} (default {DEFAULT_GUIDANCE})")
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
    parser.add_argument("--hypernet", type=Path, default=None, help="hypernetwork folder (default: the shipped e2e one)")
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped world model)")
    parser.add_argument("--out", required=True, help="grid.png, or a folder (existing, or ending in '/') for the images and grid.png")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per sampling run")
    parser.add_argument("--device", default="cpu", help="torch device of the UNet and hypernetwork (cpu, cuda, cuda:1, mps)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the UNet (the sampler state stays float32)")
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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    if args.guidance not in GUIDANCE:
        raise ConfigError(f"unknown --guidance {args.guidance!r}; choose one of {', '.join(GUIDANCE)}")
    args.pers_interval = parse_interval(args.pers_interval)
    if args.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    for name in ("guidance_scale", "w_base", "w_pers", "lora_scale"):
        _check_finite("--" + name.replace("_", "-"), getattr(args, name))


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def run(args: argparse.Namespace) -> int:
    from hyperbooth.images import image_files, load_image
    from hyperbooth.lora.io import load_lora
    from hyperbooth.world.base_model import WorldBaseModel, to_uint8

    _check_args(args)
    folder, grid_path = output_paths(args.out)
    mix = parse_mix(args.mix) if args.mix else None
    device = _device(args.device)
    base = WorldBaseModel.from_pretrained(args.model, device=device)
    base.unet.to(DTYPES[args.dtype])
    weights, subject = None, "base model (CFG)"
    if args.images:
        hypernet = load_hypernet(args.hypernet).to(device)
        files = image_files(args.images)
        refs = torch.stack([load_image(f, size=base.resolution) for f in files]).to(device)  # (k, 3, H, W)
        weights, ms = personalize_refs(hypernet, base, refs[None])
        subject = f"{len(files)} reference image(s), hypernetwork pass {ms:.1f} ms"
    elif args.lora:
        weights, subject = load_lora(args.lora, base.unet).unet, str(args.lora)
    elif mix:
        weights, subject = mix_loras(mix, base.unet), " + ".join(f"{w:g}·{p}" for p, w in mix)

    if weights is not None:
        weights = weights.to(device=device, dtype=DTYPES[args.dtype])
    seeds = list(range(args.seed, args.seed + args.num_images))
    t0 = time.perf_counter()
    images = {}  # seed → (P, 3, H, W); cell (prompt i, seed s) is row i of the run with seed s
    for s in seeds:
        images[s] = generate(
            base, args.prompt, weights, guidance=args.guidance, guidance_scale=args.guidance_scale, w_base=args.w_base,
            w_pers=args.w_pers, pers_interval=args.pers_interval, steps=args.steps, seed=s, scheduler=args.scheduler, lora_scale=args.lora_scale,
            progress=args.progress,
        )
    seconds = (time.perf_counter() - t0) / (len(seeds) * len(args.prompt))
    cells = [list(to_uint8(images[s])) for s in seeds]
    captions = [[f"{p}\nseed {s}" for p in args.prompt] for s in seeds]
    grid = captioned_grid(cells, captions)
    files = [(grid_path, grid)]
    if folder is not None:
        files = [(folder / f"{i:02d}_{_slug(prompt)}_seed{s}.png", image)
                 for s, row in zip(seeds, cells) for i, (prompt, image) in enumerate(zip(args.prompt, row))] + files
    write_pngs(files, folder)
    mode = "base model" if weights is None else args.guidance
    print(f"wrote {grid_path}: {len(args.prompt)} prompt(s) x {len(seeds)} seed(s), {mode}, {args.steps} {args.scheduler} steps, "
          f"{seconds:.2f} s per image; subject: {subject}")
    return 0
