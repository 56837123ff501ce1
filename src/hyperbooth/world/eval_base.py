"""The world's base model measured by the oracles (``hyperbooth world eval-base``): prompt fidelity per attribute on
held-out prompts (held-out class-background combinations included), sample diversity against renders, and how
crisply subjects are drawn: the attribute oracle's confidence in a generation's pattern and colours against its
confidence on renders (a speckled blob has no clear pattern or secondary colour).

Generations use CFG (:func:`hyperbooth.generate.generate` without a LoRA), chunk ``b`` of ``batch_size`` prompts
seeded ``seed + b``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.generate import generate
from hyperbooth.grids import grid, save_png, to_uint8
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS
from hyperbooth.world import contexts as ctx
from hyperbooth.world.datasets import labels_of
from hyperbooth.world.oracles import HEADS, AttributeClassifier, Oracles, identity_views
from hyperbooth.world.splits import identity_seeds


def eval_prompts(num: int, seed: int) -> list[tuple[str, ctx.Context]]:
    """``num`` (class, context) pairs spread over every background, recolour and accessory, held-out combos
    included; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    backgrounds = [None] + [b for b in ctx.BACKGROUND_NAMES if b != "none"]
    recolors = [None] + [r for r in ctx.RECOLORS if r != "none"]
    accessories = [None] + [a for a in ctx.ACCESSORIES if a != "none"]
    out = []
    for i in range(num):
        background = backgrounds[i % len(backgrounds)]
        recolor = recolors[rng.integers(len(recolors))] if rng.random() < 0.4 else None
        accessory = accessories[rng.integers(len(accessories))] if rng.random() < 0.25 else None
        class_name = ctx.CLASSES[rng.integers(len(ctx.CLASSES))]
        out.append((class_name, ctx.Context(background=background, recolor=recolor, accessory=accessory)))
    return out


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive chunks of ``n`` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


#: The attribute heads whose confidence tells a crisp subject from a speckled one (not the primary colour: a recolour
#: prompt gives it a colour no head knows).
CRISPNESS_HEADS = ("secondary", "pattern")


@torch.no_grad()
def attribute_confidence(attributes: AttributeClassifier, images: torch.Tensor) -> float:
    """The attribute oracle's mean top-class probability over :data:`CRISPNESS_HEADS` and images (1 = sure)."""
    logits = attributes(images)
    return float(torch.stack([logits[h].softmax(-1).amax(-1).mean() for h in CRISPNESS_HEADS]).mean())


def mean_pairwise_cos(z: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of unit vectors ``z (n, d)``."""
    n = z.shape[0]
    sim = z @ z.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def evaluate_base_model(
    model: WorldBackbone,
    oracles: Oracles,
    num: int = 320,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    steps: int = DEFAULT_STEPS,
    scheduler: str = DEFAULT_SCHEDULER,
    seed: int = 0,
    batch_size: int = 32,
    diversity_prompts: int = 8,
    diversity_seeds: int = 6,
    grid_path=None,
) -> dict[str, float]:
    """Generate ``num`` images from evaluation prompts; oracle accuracy per attribute; diversity against renders;
    with an attribute oracle, ``gen_attribute_confidence`` against ``render_attribute_confidence`` (crispness).

    ``grid_path``: also write the first generations as a PNG grid, one row per background (plain first).
    """
    t0 = time.perf_counter()
    sample = dict(guidance="cfg", guidance_scale=guidance_scale, steps=steps, scheduler=scheduler)
    pairs = eval_prompts(num, seed)
    correct = {name: [] for name in HEADS}
    heldout = []
    kept = []
    confidence = []
    for b, chunk in enumerate(batched(pairs, batch_size)):
        prompts = [ctx.prompt_for(c, context) for c, context in chunk]
        images = generate(model, prompts, None, seed=seed + b, **sample)
        pred = oracles.context.predict(images)
        kept.extend(zip(chunk, to_uint8(images)))
        if oracles.attributes is not None:
            confidence.append(attribute_confidence(oracles.attributes, images) * len(chunk))
        for i, (class_name, context) in enumerate(chunk):
            labels = labels_of(class_name, context)
            correct["class"].append(int(pred["class"][i] == labels["class"]))
            if context.background is not None:
                correct["background"].append(int(pred["background"][i] == labels["background"]))
            if context.recolor is not None:
                correct["recolor"].append(int(pred["recolor"][i] == labels["recolor"]))
            if context.accessory is not None:
                correct["accessory"].append(int(pred["accessory"][i] == labels["accessory"]))
            if ctx.is_heldout_context(class_name, context) and context.background is not None:
                heldout.append(int(pred["background"][i] == labels["background"]))
    if grid_path is not None:
        write_grid(kept, grid_path)
    results: dict[str, float] = {"generations": float(num)}
    for name, values in correct.items():
        results[f"{name}_accuracy"] = float(np.mean(values)) if values else float("nan")
        results[f"{name}_count"] = float(len(values))
    results["heldout_combo_background_accuracy"] = float(np.mean(heldout)) if heldout else float("nan")

    # Diversity: identity cosine between generations of one prompt under different seeds, against renders.
    gen_cos = []
    for p, (class_name, context) in enumerate(pairs[:diversity_prompts]):
        prompt = ctx.prompt_for(class_name, context)
        images = torch.cat([generate(model, [prompt], None, seed=10_000 + 97 * p + s, **sample) for s in range(diversity_seeds)])
        gen_cos.append(mean_pairwise_cos(oracles.identity(images)))
    rng = np.random.default_rng(seed)
    seeds = list(identity_seeds("test", diversity_prompts))
    renders = identity_views(seeds, diversity_seeds, rng)  # (P · S, 3, H, W), identity-major
    views = renders.view(diversity_prompts, diversity_seeds, *renders.shape[1:])
    same_identity = [mean_pairwise_cos(oracles.identity(v)) for v in views]
    different = oracles.identity(views[:, 0])
    results["gen_same_prompt_identity_cos"] = float(np.mean(gen_cos))
    results["render_same_identity_cos"] = float(np.mean(same_identity))
    results["render_different_identity_cos"] = mean_pairwise_cos(different)
    if oracles.attributes is not None:
        results["gen_attribute_confidence"] = sum(confidence) / num
        results["render_attribute_confidence"] = attribute_confidence(oracles.attributes, renders)
    results["minutes"] = (time.perf_counter() - t0) / 60
    return results


def write_grid(generations, path, per_row: int = 8) -> None:
    """``generations``: ``((class, context), (H, W, 3) uint8)`` pairs → a PNG grid with one row per background
    (plain first), up to ``per_row`` generations each."""
    rows: dict = {}
    for (class_name, context), image in generations:
        rows.setdefault(context.background, [])
        if len(rows[context.background]) < per_row:
            rows[context.background].append(image)
    order = [None] + [b for b in ctx.BACKGROUNDS if b in rows]
    save_png(grid([rows[b] for b in order if b in rows], upscale=3), path)
