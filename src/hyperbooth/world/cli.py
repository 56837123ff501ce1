"""`hyperbooth world sample | train-oracles | eval-oracles | eval-base`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hyperbooth.errors import ConfigError
from hyperbooth.files import atomic_write


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("world", help="the embedded DreamBench-World: renders, oracles, base-model figures")
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    sample = sub.add_parser("sample", help="write a grid of identities x contexts")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--split", default="test")
    sample.add_argument("--identities", type=_int, default=6)
    sample.add_argument("--contexts", default="plain,snow,beach,jungle,wooden_floor,pink_fabric,city,water,mountain,blue_house,purple_rug,wheat_field,cobblestone,red,purple,red_hat")
    sample.add_argument("--resolution", type=_int, default=32)
    sample.add_argument("--seed", type=_int, default=0, help="first identity seed to consider")
    sample.add_argument("--upscale", type=_int, default=4)
    sample.set_defaults(func=_sample)

    train = sub.add_parser("train-oracles", help="train the identity encoder and context classifier (evaluation only)")
    train.add_argument("--out", type=Path, default=None, help="folder (default: the package's shipped oracles)")
    train.add_argument("--steps", type=_int, default=None)
    train.set_defaults(func=_train_oracles)

    ev = sub.add_parser("eval-oracles", help="print the oracles' held-out figures")
    ev.add_argument("--oracles", type=Path, default=None)
    ev.add_argument("--num", type=_int, default=500)
    ev.set_defaults(func=_eval_oracles)

    base = sub.add_parser("eval-base", help="generate from held-out prompts and print the base model's figures")
    base.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped one)")
    base.add_argument("--oracles", type=Path, default=None)
    base.add_argument("--num", type=_int, default=320)
    base.add_argument("--guidance-scale", type=float, default=3.0)
    base.add_argument("--steps", type=_int, default=25)
    base.add_argument("--scheduler", default="ddim")
    base.add_argument("--json", type=Path, default=None, help="also write the figures here")
    base.add_argument("--grid", type=Path, default=None, help="also write a grid of generations here")
    base.set_defaults(func=_eval_base)


def write_png(image: np.ndarray, out: Path) -> Path:
    """Write ``(H, W, 3)`` uint8 as PNG atomically."""
    from PIL import Image

    return atomic_write(out, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def grid(images: list[list[np.ndarray]], upscale: int = 1, pad: int = 1) -> np.ndarray:
    """Rows of equally sized ``(H, W, 3)`` images → one image, nearest-neighbour upscaled, white gutters."""
    h, w, _ = images[0][0].shape
    rows, cols = len(images), max(len(r) for r in images)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            out[pad + i * (h + pad) : pad + i * (h + pad) + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = img
    return out.repeat(upscale, axis=0).repeat(upscale, axis=1)


def _sample(args: argparse.Namespace) -> int:
    from hyperbooth.world.contexts import Context
    from hyperbooth.world.render import check_resolution, render
    from hyperbooth.world.splits import identity_seeds

    check_resolution(args.resolution)
    if args.identities < 1 or args.upscale < 1:
        raise ConfigError("--identities and --upscale must be at least 1")
    contexts = [Context.parse(name.strip()) for name in args.contexts.split(",") if name.strip()]
    seeds = list(identity_seeds(args.split, args.identities, start=args.seed))
    images = [[render(s, context=c, resolution=args.resolution) for c in contexts] for s in seeds]
    write_png(grid(images, args.upscale), args.out)
    print(f"wrote {args.out}: {len(seeds)} identities x {len(contexts)} contexts")
    return 0


def _train_oracles(args: argparse.Namespace) -> int:
    from hyperbooth.world.oracles import SHIPPED_ORACLES, OracleTrainConfig, train_oracles

    cfg = OracleTrainConfig() if args.steps is None else OracleTrainConfig(steps=args.steps)
    figures = train_oracles(args.out or SHIPPED_ORACLES, cfg)
    print(json.dumps(figures, indent=2))
    return 0


def _eval_oracles(args: argparse.Namespace) -> int:
    from hyperbooth.world.oracles import Oracles, evaluate_oracles

    oracles = Oracles.load(args.oracles)
    print(json.dumps(evaluate_oracles(oracles.identity, oracles.context, n=args.num), indent=2))
    return 0


def _eval_base(args: argparse.Namespace) -> int:
    from hyperbooth.world.base_model import WorldBaseModel
    from hyperbooth.world.evaluate import evaluate_base_model
    from hyperbooth.world.oracles import Oracles

    model = WorldBaseModel.from_pretrained(args.model)
    oracles = Oracles.load(args.oracles)
    figures = evaluate_base_model(model, oracles, num=args.num, guidance_scale=args.guidance_scale, steps=args.steps, scheduler=args.scheduler, grid_path=args.grid)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0
