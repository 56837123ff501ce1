"""`hyperbooth train` (any registered trainable method on any backbone) and `hyperbooth train-base` (the world's
base model): a YAML preset plus key=value overrides.

    hyperbooth train --config configs/e2e_world.yaml                        # the e2e method on the world
    hyperbooth train --config configs/e2e_sd15.yaml base_model=models/stable-diffusion-v1-5
    hyperbooth preoptimize --config configs/hyperdreambooth_preopt_world.yaml   # HyperDreamBooth's targets θ*
    accelerate launch --multi_gpu -m hyperbooth train --config configs/e2e_sd15.yaml   # data parallel
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.config import load_config
from hyperbooth.train.base import BaseTrainConfig, train_base
from hyperbooth.train.engine import load_train_config, train
from hyperbooth.train.preoptimize import PreoptConfig, preoptimize


def _add(subparsers, name: str, help: str, example: str, run) -> None:
    parser = subparsers.add_parser(name, help=help)
    parser.add_argument("--config", type=Path, default=None, help=f"YAML preset (e.g. {example})")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.max_steps=100 hypernet.rank=4")
    parser.set_defaults(func=run)


def register(subparsers) -> None:
    _add(subparsers, "train", "train a hypernetwork (any registered method) on a backbone (the world, SD 1.5); accelerate-ready",
         "configs/e2e_world.yaml", _train)
    _add(subparsers, "train-base", "train the embedded world's text-to-image base model", "configs/world_base.yaml", _train_base)
    _add(subparsers, "preoptimize", "HyperDreamBooth's pre-optimization: LiDB weights per training identity, a shard of identities at once",
         "configs/hyperdreambooth_preopt_world.yaml", _preoptimize)


def _train_base(args: argparse.Namespace) -> int:
    folder = train_base(load_config(BaseTrainConfig, args.config, args.overrides), resume=args.resume)
    print(f"base model written to {folder}")
    return 0


def _train(args: argparse.Namespace) -> int:
    folder = train(load_train_config(args.config, args.overrides), resume=args.resume)
    print(f"hypernetwork written to {folder}")
    return 0


def _preoptimize(args: argparse.Namespace) -> int:
    folder = preoptimize(load_config(PreoptConfig, args.config, args.overrides), resume=args.resume)
    print(f"pre-optimized targets written to {folder}")
    return 0
