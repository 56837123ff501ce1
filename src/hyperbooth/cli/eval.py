"""`hyperbooth eval --config configs/eval_world.yaml --json out.json [--report out.html] [key=value …]`: the DreamBench
protocol (:mod:`hyperbooth.evaluation.protocol`) on any registered method."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperbooth.config import load_config
from hyperbooth.evaluation.protocol import EvalConfig, run_eval
from hyperbooth.evaluation.report import markdown_table


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="the DreamBench protocol: subjects x prompts x seeds, DINO / CLIP-I / CLIP-T / face / oracle metrics")
    parser.add_argument("--config", type=Path, default=None, help="YAML preset (configs/eval_world.yaml, configs/eval_dreambench_sd15.yaml)")
    parser.add_argument("--json", type=Path, required=True, help="results file to write (rewritten after every subject)")
    parser.add_argument("--report", type=Path, default=None, help="also write an HTML report with image grids here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. method.kind=personalizer method.path=runs/e2e_world/hypernet method.guidance=hm-cfg")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EvalConfig, args.config, args.overrides)
    results = run_eval(cfg, args.json, args.report)
    print(markdown_table(results))
    print(f"\nwrote {args.json}" + (f" and {args.report}" if args.report else "") + f" ({results['status']}, {results['seconds']:.0f} s)")
    for f in results["failures"]:
        where = f["subject"] + (f" / {f['prompt']!r}" if f["prompt"] else "")
        print(f"failed: {where}: {f['stage']}: {f['error']}")
    return 0 if results["status"] == "complete" else 1
