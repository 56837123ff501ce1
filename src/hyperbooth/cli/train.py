"""`hyperbooth train` (hypernetworks) and `hyperbooth train-base` (the world's base model): a YAML preset plus
key=value overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.config import load_config


def _add(subparsers, name: str, help: str, example: str, run) -> None:
    parser = subparsers.add_parser(name, help=help)
    parser.add_argument("--config", type=Path, default=None, help=f"YAML preset (e.g. {example})")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.max_steps=100")
    parser.set_defaults(func=run)


def register(subparsers) -> None:
    _add(subparsers, "train", "train a hypernetwork (e2e) on the embedded world; accelerate-ready", "configs/e2e_world.yaml", _train_hyper)
    _add(subparsers, "train-base", "train the embedded world's text-to-image base model", "configs/world_base.yaml", _train_base)


def _train_base(args: argparse.Namespace) -> int:
    from hyperbooth.train.base import BaseTrainConfig, train_base

    folder = train_base(load_config(BaseTrainConfig, args.config, args.overrides), resume=args.resume)
    print(f"base model written to {folder}")
    return 0


def _train_hyper(args: argparse.Namespace) -> int:
    from hyperbooth.train.hyper import HyperTrainConfig, train_hypernet

    folder = train_hypernet(load_config(HyperTrainConfig, args.config, args.overrides), resume=args.resume)
    print(f"hypernetwork written to {folder}")
    return 0
