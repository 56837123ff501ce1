"""Interpolation between two subjects A → B, scored by the identity oracle: does the generation move from A to B
smoothly?

For P pairs of held-out world identities of one class (so one prompt fits both), each method predicts A's and B's
LoRA from one reference each and mixes them at ``α = 0, 0.25, 0.5, 0.75, 1``: a HyperLoRA in its coefficient space
(``(1 − α) c_A + α c_B``, :meth:`~hyperbooth.methods.hyperlora.HyperLoRA.mix`), any other method in ΔW
(``(1 − α) ΔW_A + α ΔW_B``, exact, :func:`~hyperbooth.lora.weights.combine`). Each mixture generates the world
table's non-recolour prompts (plain, a background, the hat; a recolour would change the colours the oracle tells
the two apart by) with HM-CFG (or CFG), and the oracle scores every image against both identities:

- ``top1 A`` / ``top1 B``: identity retrieval top-1 among 8 of the class for A and for B (chance 0.125);
- ``A over B``: the share of images closer to A's prototype than to B's (1 at α = 0 and 0 at α = 1 for a perfect
  method; a smooth method crosses 0.5 near α = 0.5).

    python benchmarks/interpolation.py --hypernet src/hyperbooth/assets/world/hyperlora --pairs 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import replace

import torch

from hyperbooth import methods
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.lora.weights import LoRAWeights, combine, stack
from hyperbooth.prompts import RARE_TOKEN
from hyperbooth.world.fidelity import identity_prototype, identity_retrieval, reference_images
from hyperbooth.world.identity import identity_class
from hyperbooth.world.oracles import Oracles
from hyperbooth.world.protocol import personalization_items
from hyperbooth.world.splits import identity_seeds


def same_class_pairs(n_pairs: int, split: str = "test") -> list[tuple[int, int]]:
    """The first ``n_pairs`` pairs of consecutive held-out identities of one class, in seed order (deterministic)."""
    waiting: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for seed in identity_seeds(split, 10_000):
        cls = identity_class(seed)
        if cls in waiting:
            pairs.append((waiting.pop(cls), seed))
            if len(pairs) == n_pairs:
                return pairs
        else:
            waiting[cls] = seed
    raise ConfigError(f"the {split} split holds fewer than {n_pairs} same-class pairs")


def mixture(personalizer, ref_a: torch.Tensor, ref_b: torch.Tensor, alpha: float, base) -> LoRAWeights:
    """One subject's LoRA between A and B (coefficients for a HyperLoRA, ΔW otherwise)."""
    if hasattr(personalizer, "interpolate"):
        return personalizer.interpolate(ref_a, ref_b, alpha)
    with torch.no_grad():
        a = personalizer.personalize(ref_a[None], base)
        b = personalizer.personalize(ref_b[None], base)
    a, b = (w["unet"] if isinstance(w, dict) else w for w in (a, b))
    return combine([a, b], [1.0 - alpha, alpha])


def _default_label(folder: str) -> str:
    """A folder's name, or its parent's for a training run's ``…/hypernet``."""
    path = os.path.abspath(folder)
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "hypernet" else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", action="append", required=True, help="personalizer folder; repeat to compare")
    parser.add_argument("--label", action="append", default=None, help="row label of each --hypernet, in order")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--prompts", type=int, default=4, help="world-table prompts per pair before dropping recolours")
    parser.add_argument("--guidance", default="hm-cfg", choices=("cfg", "hm-cfg"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--oracles", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas) or args.pairs < 1:
        raise ConfigError(f"--alphas must lie in [0, 1] (got {args.alphas!r}) and --pairs be at least 1")
    labels = args.label or [_default_label(h) for h in args.hypernet]
    if len(labels) != len(args.hypernet):
        raise ConfigError(f"{len(args.hypernet)} --hypernet but {len(labels)} --label")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"command: {' '.join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])])}")

    base = WorldBackbone.from_pretrained(args.model)
    oracles = Oracles.load(args.oracles)
    pairs = same_class_pairs(args.pairs)
    # the world table's contexts of each A, recolours left out (they change the colours that tell A from B)
    items_a = [it for it in personalization_items([a for a, _ in pairs], args.prompts) if it.context.recolor is None]
    pair_of = {a: i for i, (a, _) in enumerate(pairs)}
    items_b = [replace(it, identity_seed=pairs[pair_of[it.identity_seed]][1]) for it in items_a]
    prompts = [it.prompt(RARE_TOKEN) for it in items_a]
    rows = [pair_of[it.identity_seed] for it in items_a]
    refs = {s: reference_images(s, 1, resolution=base.resolution)[0] for pair in pairs for s in pair}
    protos = {s: identity_prototype(oracles, s) for pair in pairs for s in pair}

    results = []
    for label, folder in zip(labels, args.hypernet):
        personalizer = methods.load(folder).eval()
        for alpha in alphas:
            t0 = time.perf_counter()
            weights = stack([mixture(personalizer, refs[a][None], refs[b][None], alpha, base) for a, b in pairs]).select(rows)
            images = generate(base, prompts, weights=weights, guidance=args.guidance, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                              w_base=DEFAULT_W_BASE, w_pers=DEFAULT_W_PERS, steps=args.steps, seed=args.seed).cpu()
            top_a = identity_retrieval(oracles, images, [it.identity_seed for it in items_a])["top1"]
            top_b = identity_retrieval(oracles, images, [it.identity_seed for it in items_b])["top1"]
            z = oracles.identity(images)
            sims = defaultdict(list)
            for i, (ia, ib) in enumerate(zip(items_a, items_b)):
                sims["a"].append(float(protos[ia.identity_seed] @ z[i]))
                sims["b"].append(float(protos[ib.identity_seed] @ z[i]))
            a_over_b = float((torch.tensor(sims["a"]) > torch.tensor(sims["b"])).double().mean())
            r = {"label": label, "alpha": alpha, "top1_a": float(top_a.mean()), "top1_b": float(top_b.mean()), "a_over_b": a_over_b,
                 "images": len(items_a), "seconds": time.perf_counter() - t0}
            results.append(r)
            print(f"{label:24s} alpha {alpha:4.2f}  top1 A {r['top1_a']:.3f}  top1 B {r['top1_b']:.3f}  A over B {a_over_b:.3f}", flush=True)

    print(f"\n{len(pairs)} same-class pairs of held-out identities, {len(items_a)} images per α, {args.guidance}, {args.steps} steps")
    print("| method | α (toward B) | retrieval top-1 of A | retrieval top-1 of B | closer to A than to B |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['label']} | {r['alpha']:.2f} | {r['top1_a']:.3f} | {r['top1_b']:.3f} | {r['a_over_b']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": pairs, "alphas": alphas, "results": results, "argv": argv if argv is not None else sys.argv[1:]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
