"""Interpolation between two subjects A → B, scored by the identity oracle: does the generation move from A to B
smoothly?

For P pairs of held-out world identities of one class (so one prompt fits both), each method predicts A's and B's
LoRA from one reference each, once, and mixes them at ``α = 0, 0.25, 0.5, 0.75, 1``: a HyperLoRA in its
coefficient space (``(1 − α) c_A + α c_B``, :meth:`~hyperbooth.methods.hyperlora.HyperLoRA.mix`), any other method
in ΔW (``(1 − α) ΔW_A + α ΔW_B``, exact, :func:`~hyperbooth.lora.weights.combine`). Each mixture generates the world
table's non-recolour prompts (plain, a background, the hat; a recolour would change the colours the oracle tells
the two apart by) with HM-CFG (or CFG), and the identity oracle scores every image against both identities:

- ``top1 A`` / ``top1 B``: retrieval top-1 of A and of B against one shared candidate set per pair — A, B and 6
  other held-out identities of the class (chance 0.125), so the two columns are comparable;
- ``margin``: the mean of ``cos(z, A) − cos(z, B)`` (z the image's oracle embedding, A and B the identities'
  prototypes), and ``progress`` = ``(margin(0) − margin(α)) / (margin(0) − margin(1))``: 0 at A's end, 1 at B's; a
  smooth crossing moves it by about 0.25 per step, a switch jumps;
- ``closest``: the mean of ``max(cos(z, A), cos(z, B))``, which falls at a midpoint that is neither subject (a
  mixture that collapses toward the base model); the base model's own (no LoRA) is printed beside it.

    python benchmarks/interpolation.py --hypernet src/hyperbooth/assets/world/hyperlora --hypernet src/hyperbooth/assets/world/e2e --pairs 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from hyperbooth import methods
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.lora.weights import LoRAWeights, combine, stack
from hyperbooth.prompts import RARE_TOKEN
from hyperbooth.world.fidelity import RETRIEVAL_CANDIDATES, distractors, identity_prototype, reference_images
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


def endpoints(personalizer, ref_a: torch.Tensor, ref_b: torch.Tensor, base):
    """What ``mixture`` mixes, computed once per pair: A's and B's coefficients (HyperLoRA) or denoiser LoRAs."""
    with torch.no_grad():
        if hasattr(personalizer, "mix"):
            return personalizer.coefficients(ref_a[None]), personalizer.coefficients(ref_b[None])
        a, b = (personalizer.personalize(r[None], base) for r in (ref_a, ref_b))
    return tuple(w["unet"] if isinstance(w, dict) else w for w in (a, b))  # the world's LoRAs are the UNet's alone


def mixture(personalizer, ends, alpha: float) -> LoRAWeights:
    """One subject's LoRA at ``alpha`` between A and B (coefficients for a HyperLoRA, ΔW otherwise)."""
    if hasattr(personalizer, "mix"):
        return personalizer.mix(list(ends), [1.0 - alpha, alpha])
    return combine(list(ends), [1.0 - alpha, alpha])


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
    items = [it for it in personalization_items([a for a, _ in pairs], args.prompts) if it.context.recolor is None]
    pair_of = {a: i for i, (a, _) in enumerate(pairs)}
    rows = [pair_of[it.identity_seed] for it in items]
    prompts = [it.prompt(RARE_TOKEN) for it in items]
    refs = {s: reference_images(s, 1, resolution=base.resolution)[0] for pair in pairs for s in pair}
    # one candidate set per pair: A, B and 6 other held-out identities of the class
    candidates = [[a, b, *[d for d in distractors(a, RETRIEVAL_CANDIDATES) if d != b][:RETRIEVAL_CANDIDATES - 2]] for a, b in pairs]
    protos = {s: identity_prototype(oracles, s) for cands in candidates for s in cands}

    def score(images: torch.Tensor) -> dict:
        z = oracles.identity(images)  # (n, d), unit norm
        top_a, top_b, margin, closest = [], [], [], []
        for i, row in enumerate(rows):
            sims = torch.stack([protos[s] for s in candidates[row]]) @ z[i]  # A, B, 6 others
            top_a.append(float(sims.argmax() == 0))
            top_b.append(float(sims.argmax() == 1))
            margin.append(float(sims[0] - sims[1]))
            closest.append(float(sims[:2].max()))
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        return {"top1_a": mean(top_a), "top1_b": mean(top_b), "margin": mean(margin), "closest": mean(closest)}

    sample = dict(guidance_scale=DEFAULT_GUIDANCE_SCALE, w_base=DEFAULT_W_BASE, w_pers=DEFAULT_W_PERS, steps=args.steps, seed=args.seed)
    floor = score(generate(base, prompts, weights=None, guidance="cfg", **sample).cpu())
    print(f"base model (no LoRA): top1 A {floor['top1_a']:.3f}  top1 B {floor['top1_b']:.3f}  margin {floor['margin']:+.3f}  closest {floor['closest']:.3f}")
    results = []
    for label, folder in zip(labels, args.hypernet):
        personalizer = methods.load(folder).eval()
        ends = [endpoints(personalizer, refs[a], refs[b], base) for a, b in pairs]
        for alpha in alphas:
            t0 = time.perf_counter()
            weights = stack([mixture(personalizer, e, alpha) for e in ends]).select(rows)
            images = generate(base, prompts, weights=weights, guidance=args.guidance, **sample).cpu()
            r = {"label": label, "alpha": alpha, **score(images), "images": len(items), "seconds": time.perf_counter() - t0}
            results.append(r)
            print(f"{label:24s} alpha {alpha:4.2f}  top1 A {r['top1_a']:.3f}  top1 B {r['top1_b']:.3f}  margin {r['margin']:+.3f}  "
                  f"closest {r['closest']:.3f}", flush=True)
        own = [r for r in results if r["label"] == label]
        m0, m1 = own[0]["margin"], own[-1]["margin"]
        for r in own:
            r["progress"] = (m0 - r["margin"]) / (m0 - m1) if m0 != m1 else float("nan")

    print(f"\n{len(pairs)} same-class pairs of held-out identities, {len(items)} images per α, {args.guidance}, {args.steps} steps; "
          f"candidates per pair: A, B and {RETRIEVAL_CANDIDATES - 2} others")
    print("| method | α (toward B) | retrieval top-1 of A | retrieval top-1 of B | margin cos(A) − cos(B) | progress A → B | closest of A, B |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| base model (no LoRA) | – | {floor['top1_a']:.3f} | {floor['top1_b']:.3f} | {floor['margin']:+.3f} | – | {floor['closest']:.3f} |")
    for r in results:
        print(f"| {r['label']} | {r['alpha']:.2f} | {r['top1_a']:.3f} | {r['top1_b']:.3f} | {r['margin']:+.3f} | {r['progress']:.2f} | {r['closest']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": pairs, "alphas": alphas, "floor": floor, "results": results,
                       "argv": argv if argv is not None else sys.argv[1:]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
