"""The `hyperbooth` command: one sub-command per job, each in its own module of this package, which parses the
arguments and calls library functions (the same ones the Python API and the web page use).

A sub-command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` (Namespace → exit
code). Bad input raises :class:`~hyperbooth.errors.HyperboothError`, which ends here as one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import diffusers
import transformers

import hyperbooth
from hyperbooth.errors import HyperboothError

#: Modules that register sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "hyperbooth.cli.demo",
    "hyperbooth.cli.personalize",
    "hyperbooth.cli.import_hyperlora",
    "hyperbooth.cli.finetune",
    "hyperbooth.cli.generate",
    "hyperbooth.cli.lora",
    "hyperbooth.cli.train",
    "hyperbooth.cli.world",
    "hyperbooth.cli.eval",
    "hyperbooth.cli.ui",
)

log = logging.getLogger("hyperbooth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperbooth",
        description="Finetuning-free personalization of text-to-image diffusion models: photos → LoRA in one pass.",
    )
    parser.add_argument("--version", action="version", version=f"hyperbooth {hyperbooth.__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _quiet_libraries() -> None:
    """diffusers/transformers log loading chatter and progress bars at INFO; keep their errors only."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        _quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except HyperboothError as e:
        print(f"hyperbooth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyperbooth {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
