"""How good is the space HyperDreamBooth predicts in: LiDB weights pre-optimized for world identities (the procedure
and settings of ``hyperbooth preoptimize``, :func:`hyperbooth.train.preoptimize.optimize_shard`), scored like the
world table's rows along the optimization.

For M identities of ``--split`` (held-out ``test`` by default, the world table's first M; ``val`` for tuning), all
optimized at once as one shard, each checkpoint's LoRAs generate every identity's evaluation prompts (the world
table's: plain, a background, a recolour, the hat; rare-token prompts) with CFG and HM-CFG, and the oracles score them
(:func:`hyperbooth.world.fidelity.personalization_metrics`: identity retrieval top-1 among 8 first). The figures are
an upper bound of what a hypernetwork predicting in this space can reach: the targets see renders of their identity
in many contexts (``mode: cross``), which a hypernetwork never gets at inference.

    python benchmarks/lidb_targets.py --identities 16 --checkpoints 100,200,300 [preopt overrides: lr=1e-2 rank=2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.config import load_config
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.methods.hyperdreambooth import all_target_shapes
from hyperbooth.methods.lidb import aux_bases, lidb_weights
from hyperbooth.prompts import RARE_TOKEN
from hyperbooth.train.preoptimize import PreoptConfig, optimize_shard
from hyperbooth.world.fidelity import personalization_metrics
from hyperbooth.world.oracles import Oracles
from hyperbooth.world.protocol import personalization_items
from hyperbooth.world.splits import identity_seeds

FIGURES = ("retrieval", "auc", "attr_primary", "attr_secondary", "attr_pattern", "attr_shape", "subject", "prompt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="world base model folder (default: the shipped one)")
    parser.add_argument("--oracles", default=None, help="oracle folder (default: the shipped one)")
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--prompts", type=int, default=4, help="evaluation prompts per identity")
    parser.add_argument("--checkpoints", default="100,200,300", help="optimizer steps to score, a list")
    parser.add_argument("--sample-steps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pre-optimization settings (PreoptConfig), e.g. lr=1e-2 rank=2")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c.strip()})
    if not checkpoints or checkpoints[0] < 1 or args.identities < 1:
        raise ConfigError("--checkpoints must be positive step counts and --identities at least 1")
    cfg = load_config(PreoptConfig, None, [*args.overrides, f"steps={checkpoints[-1]}"])
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"command: {' '.join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])])}")

    base = WorldBackbone.from_pretrained(args.model)
    oracles = Oracles.load(args.oracles)
    seeds = list(identity_seeds(args.split, args.identities))
    items = personalization_items(seeds, args.prompts)
    row_of = {s: i for i, s in enumerate(seeds)}
    rows = torch.tensor([row_of[it.identity_seed] for it in items])
    prompts = [it.prompt(RARE_TOKEN) for it in items]
    shapes = all_target_shapes(base, cfg.targets)
    bases = aux_bases(shapes, cfg.a, cfg.b, cfg.basis_seed)
    results, outside = [], 0.0
    t0 = time.perf_counter()

    def score(step: int, variables) -> None:
        nonlocal outside
        if step not in checkpoints:
            return
        t = time.perf_counter()
        weights = lidb_weights(variables, bases, float(cfg.rank)).select(rows)
        for guidance in ("cfg", "hm-cfg"):
            images = generate(base, prompts, weights=weights, guidance=guidance, guidance_scale=DEFAULT_GUIDANCE_SCALE, w_base=DEFAULT_W_BASE,
                              w_pers=DEFAULT_W_PERS, steps=args.sample_steps, seed=args.seed).cpu()
            figures = personalization_metrics(oracles, images, items)
            results.append({"step": step, "guidance": guidance, "seconds": t - t0 - outside, **{k: figures[k] for k in FIGURES}})
            r = results[-1]
            print(f"step {step:5d} {guidance:6s} {r['seconds']:7.0f} s  " + "  ".join(f"{k} {r[k]:.3f}" for k in FIGURES), flush=True)
        outside += time.perf_counter() - t

    optimize_shard(base, seeds, cfg, callback=score)
    print(f"\n{len(seeds)} {args.split} identities x {args.prompts} prompts, optimized together; seconds: the optimization alone")
    print("| step | guidance | s (all identities) | retrieval top-1 of 8 | AUC | primary | secondary | pattern | shape | cosine | prompt |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['step']} | {r['guidance']} | {r['seconds']:.0f} | " + " | ".join(f"{r[k]:.3f}" for k in FIGURES) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(cfg), "identities": seeds, "results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
