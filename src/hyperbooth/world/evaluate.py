"""Measuring the world's base model with the oracles: prompt fidelity per attribute and sample diversity.

``hyperbooth world eval-base`` prints these figures; the README's table comes from it.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from hyperbooth.world import contexts as ctx
from hyperbooth.world.base_model import WorldBaseModel, to_uint8
from hyperbooth.world.datasets import labels_of
from hyperbooth.world.oracles import HEADS, Oracles, identity_views

log = logging.getLogger(__name__)


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


def _batched(items, n):
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


@torch.no_grad()
def evaluate_base_model(
    model: WorldBaseModel,
    oracles: Oracles,
    num: int = 320,
    guidance_scale: float = 3.0,
    steps: int = 25,
    scheduler: str = "ddim",
    seed: int = 0,
    batch_size: int = 32,
    diversity_prompts: int = 8,
    diversity_seeds: int = 6,
    grid_path=None,
) -> dict[str, float]:
    """Generate ``num`` images from evaluation prompts; oracle accuracy per attribute; diversity against renders.

    ``grid_path``: also write the first generations as a PNG grid, one row per background (plain first).
    """
    t0 = time.perf_counter()
    pairs = eval_prompts(num, seed)
    correct = {name: [] for name in HEADS}
    heldout = []
    kept = []
    for b, chunk in enumerate(_batched(pairs, batch_size)):
        prompts = [ctx.prompt_for(c, context) for c, context in chunk]
        images = model.generate(prompts, guidance_scale=guidance_scale, steps=steps, seed=seed + b, scheduler=scheduler)
        pred = oracles.context.predict(images)
        kept.extend(zip(chunk, to_uint8(images)))
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
        _write_grid(kept, grid_path)
    results: dict[str, float] = {"generations": float(num)}
    for name, values in correct.items():
        results[f"{name}_accuracy"] = float(np.mean(values)) if values else float("nan")
        results[f"{name}_count"] = float(len(values))
    results["heldout_combo_background_accuracy"] = float(np.mean(heldout)) if heldout else float("nan")

    # Diversity: identity cosine between generations of one prompt under different seeds, against renders.
    gen_cos = []
    for p, (class_name, context) in enumerate(pairs[:diversity_prompts]):
        prompt = ctx.prompt_for(class_name, context)
        images = torch.cat([model.generate([prompt], guidance_scale=guidance_scale, steps=steps, seed=10_000 + 97 * p + s, scheduler=scheduler) for s in range(diversity_seeds)])
        gen_cos.append(_mean_pairwise_cos(oracles.identity(images)))
    rng = np.random.default_rng(seed)
    from hyperbooth.world.splits import identity_seeds

    seeds = list(identity_seeds("test", diversity_prompts))
    renders = identity_views(seeds, diversity_seeds, rng)  # (P · S, 3, H, W), identity-major
    views = renders.view(diversity_prompts, diversity_seeds, *renders.shape[1:])
    same_identity = [_mean_pairwise_cos(oracles.identity(v)) for v in views]
    different = oracles.identity(views[:, 0])
    results["gen_same_prompt_identity_cos"] = float(np.mean(gen_cos))
    results["render_same_identity_cos"] = float(np.mean(same_identity))
    results["render_different_identity_cos"] = _mean_pairwise_cos(different)
    results["minutes"] = (time.perf_counter() - t0) / 60
    return results


def _mean_pairwise_cos(z: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of unit vectors ``z (n, d)``."""
    n = z.shape[0]
    sim = z @ z.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def _write_grid(generations, path, per_row: int = 8) -> None:
    """One row per background (plain first), up to ``per_row`` generations each."""
    from hyperbooth.world.cli import grid, write_png

    rows: dict = {}
    for (class_name, context), image in generations:
        rows.setdefault(context.background, [])
        if len(rows[context.background]) < per_row:
            rows[context.background].append(image)
    order = [None] + [b for b in ctx.BACKGROUNDS if b in rows]
    write_png(grid([rows[b] for b in order if b in rows], upscale=3), path)
