"""`hyperbooth demo`: the quick start's main job (see :mod:`hyperbooth.demo`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hyperbooth.backbones import load_backbone
from hyperbooth.demo import DEMO_CONTEXTS, format_table, interop_check, run_demo
from hyperbooth.errors import ConfigError
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.personalize import load_personalizer
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS
from hyperbooth.world.oracles import Oracles


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="personalize held-out world subjects, generate with CFG / HM-CFG, print the oracle table")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for the files it writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped world model)")
    parser.add_argument("--hypernet", type=Path, default=None, help="hypernetwork folder of any registered method (default: the shipped one of --method)")
    parser.add_argument("--method", default=None, help="a method with a shipped world checkpoint: e2e (default), hyperdreambooth, hyperlora")
    parser.add_argument("--oracles", type=Path, default=None, help="oracle folder (default: the shipped one)")
    parser.add_argument("--no-floor", action="store_true", help="skip the base-model floor row (saves about 15%% of the time)")
    parser.add_argument("--no-interop", action="store_true", help="skip the diffusers LoRA-file check at the end")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    base = load_backbone(args.model)  # each raises CheckpointError naming the file and the fix
    hypernet = load_personalizer(args.hypernet, method=args.method)
    hypernet.check_backbone(base, source=args.hypernet)  # one built for another model is refused before anything is written
    oracles = Oracles.load(args.oracles)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table, path = run_demo(base, hypernet, oracles, out, steps=args.steps, seed=args.seed, floor=not args.no_floor)
    print(f"hyperbooth demo: 4 held-out DreamBench-World identities x {len(DEMO_CONTEXTS)} prompts, {args.steps} {DEFAULT_SCHEDULER} steps, "
          f"CFG {DEFAULT_GUIDANCE_SCALE:g}, HM-CFG w_base {DEFAULT_W_BASE:g} w_pers {DEFAULT_W_PERS:g} ({time.perf_counter() - t0:.0f} s)")
    print(format_table(table))
    print(f"grid: {path}")
    if not args.no_interop:
        print("LoRA files in diffusers (tiny SD-1.5 pipeline, random weights):")
        for key, value in interop_check(out, args.seed):
            print(f"  {key}: {value}")
    return 0
