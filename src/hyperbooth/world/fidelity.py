"""Oracle fidelity on DreamBench-World: how well a generated image shows its subject and its prompt.

- subject fidelity (the world's DINO / CLIP-I): the identity oracle's cosine between a generated image and the
  prototype of its identity over held-out renders (:func:`identity_prototype`, :func:`subject_fidelity`);
- prompt fidelity (the world's CLIP-T): 1 where the context oracle sees what the prompt asked for
  (:func:`prompt_fidelity`);
- the reference photos a user would take of an identity (:func:`reference_images`), and the summary figures of
  one set of generations (:func:`personalization_metrics`).

The one code path for these figures: the world table (:mod:`hyperbooth.world.personalization`), the oracle metrics
of ``hyperbooth eval`` (:mod:`hyperbooth.evaluation.metrics`), ``hyperbooth demo`` and
``benchmarks/time_vs_fidelity.py`` all call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hyperbooth.world import contexts as ctx
from hyperbooth.world.datasets import labels_of, sample_context, to_tensor
from hyperbooth.world.identity import make_identity
from hyperbooth.world.oracles import HEADS, Oracles, identity_views
from hyperbooth.world.render import render_identity, sample_pose


def reference_images(identity_seed: int, k: int, seed: int = 0, resolution: int = 32) -> torch.Tensor:
    """``k`` reference photos of one identity, as a user would take them: random DreamBench-World backgrounds
    (own colours, no hat) and poses; ``(k, 3, H, W)`` in [-1, 1]. Deterministic in ``(identity_seed, seed)``."""
    rng = np.random.default_rng([identity_seed, seed, 17])
    identity = make_identity(identity_seed)
    images = []
    for _ in range(k):
        context = sample_context(rng, identity.class_name, "test", recolor=False, accessory=False)
        images.append(to_tensor(render_identity(identity, context, sample_pose(rng), resolution, scene_seed=int(rng.integers(2**31)))))
    return torch.stack(images)


@torch.no_grad()
def identity_prototype(oracles: Oracles, identity_seed: int, views: int = 8, seed: int = 1) -> torch.Tensor:
    """The oracle's identity embedding of one identity: the normalized mean over ``views`` held-out renders in
    random contexts and poses (none of them the references) → ``(d,)``."""
    rng = np.random.default_rng([identity_seed, seed, 19])
    z = oracles.identity(identity_views([identity_seed], views, rng))  # (views, d)
    return torch.nn.functional.normalize(z.mean(0), dim=-1)


@torch.no_grad()
def subject_fidelity(oracles: Oracles, images: torch.Tensor, identity_seeds: Sequence[int]) -> torch.Tensor:
    """Subject fidelity per image (the world's DINO / CLIP-I): the oracle identity cosine between generated image
    ``i`` and the prototype of identity ``identity_seeds[i]`` over held-out renders; ``(B,)`` in [-1, 1]."""
    if len(identity_seeds) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(identity_seeds)} identity seeds")
    protos = {s: identity_prototype(oracles, s) for s in set(identity_seeds)}
    z = oracles.identity(images)  # (B, d), unit norm
    return (z * torch.stack([protos[s] for s in identity_seeds])).sum(-1)


@torch.no_grad()
def prompt_fidelity(oracles: Oracles, images: torch.Tensor, classes: Sequence[str], contexts: Sequence[ctx.Context]) -> dict[str, torch.Tensor]:
    """Prompt fidelity per image and attribute (the world's CLIP-T): 1 where the context oracle sees what the prompt
    asked for, 0 where not, NaN where the prompt did not ask (no background / recolour / accessory named).

    Keys: ``class``, ``background``, ``recolor``, ``accessory``, and ``context`` (all attributes the prompt named
    are right), each ``(B,)`` float.
    """
    pred = oracles.context.predict(images)
    out = {name: torch.full((images.shape[0],), float("nan")) for name in (*HEADS, "context")}
    for i, (class_name, context) in enumerate(zip(classes, contexts)):
        labels = labels_of(class_name, context)
        out["class"][i] = float(pred["class"][i] == labels["class"])
        asked = {"background": context.background, "recolor": context.recolor, "accessory": context.accessory}
        for name, value in asked.items():
            if value is not None:
                out[name][i] = float(pred[name][i] == labels[name])
        named = [out[name][i] for name, value in asked.items() if value is not None]
        out["context"][i] = float(all(v == 1 for v in named)) if named else float("nan")
    return out


def nanmean(values: torch.Tensor) -> float:
    """The mean over the entries that are not NaN (NaN when none is)."""
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else float("nan")


def standard_error(values: torch.Tensor) -> float:
    """``std / sqrt(n)`` of ``values (n,)`` (NaN for fewer than 2)."""
    n = values.numel()
    return float(values.std() / math.sqrt(n)) if n > 1 else float("nan")


@torch.no_grad()
def personalization_metrics(oracles: Oracles, images: torch.Tensor, items: Sequence) -> dict[str, float]:
    """The figures of one set of generations: subject fidelity (``subject``, its standard error ``subject_sem``),
    prompt fidelity (``prompt``: all named attributes right; ``prompt_<attribute>`` each), and both per context type
    (``subject_<type>``, ``prompt_<type>``, :data:`~hyperbooth.world.contexts.CONTEXT_TYPES`).

    ``items[i]`` describes image ``i``: any object with ``identity_seed``, ``class_name`` and ``context`` (e.g. the
    table's :class:`~hyperbooth.world.protocol.EvalItem`).
    """
    subject = subject_fidelity(oracles, images, [it.identity_seed for it in items]).float()
    prompt = prompt_fidelity(oracles, images, [it.class_name for it in items], [it.context for it in items])
    out = {"subject": float(subject.mean()), "subject_sem": standard_error(subject), "prompt": nanmean(prompt["context"])}
    for name in HEADS:
        out[f"prompt_{name}"] = nanmean(prompt[name])
    for kind in ctx.CONTEXT_TYPES:
        mask = torch.tensor([kind in it.context.types for it in items])
        out[f"subject_{kind}"] = float(subject[mask].mean()) if mask.any() else float("nan")
        out[f"prompt_{kind}"] = nanmean(prompt["context"][mask])
    return out
