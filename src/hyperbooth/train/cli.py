"""`hyperbooth train` (hypernetworks) and `hyperbooth train-base` (the world's base model): a YAML preset plus
key=value overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.config import load_config


def register(subparsers) -> None:
    register_hyper(subparsers)
    parser = subparsers.add_parser("train-base", help="train the embedded world's text-to-image base model")
    parser.add_argument("--config", type=Path, default=None, help="YAML preset (e.g. configs/world_base.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.max_steps=100")
    parser.set_defaults(func=_train_base)


def _train_base(args: argparse.Namespace) -> int:
    from hyperbooth.train.base import BaseTrainConfig, train_base

    cfg = load_config(BaseTrainConfig, args.config, args.overrides)
    folder = train_base(cfg, resume=args.resume)
    print(f"base model written to {folder}")
    return 0


def register_hyper(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a hypernetwork (e2e) on the embedded world; accelerate-ready")
    parser.add_argument("--config", type=Path, default=None, help="YAML preset (e.g. configs/e2e_world.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. output_reg=0")
    parser.set_defaults(func=_train_hyper)


def _train_hyper(args: argparse.Namespace) -> int:
    from hyperbooth.train.hyper import HyperTrainConfig, train_hypernet

    cfg = load_config(HyperTrainConfig, args.config, args.overrides)
    folder = train_hypernet(cfg, resume=args.resume)
    print(f"hypernetwork written to {folder}")
    return 0
