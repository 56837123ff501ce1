"""Oracle fidelity on DreamBench-World: how well a generated image shows its subject and its prompt.

- subject fidelity, paired across identities (the headline): identity retrieval top-1 among
  :data:`RETRIEVAL_CANDIDATES` same-class held-out identities and the pairwise AUC against them
  (:func:`identity_retrieval`): an image that looks a little like every identity scores chance (1/8, 0.5);
- attribute recovery: the identity's primary and secondary colour, pattern and shape levels read back from a
  generation by the attribute oracle, against the identity's own (:func:`attribute_recovery`, chance levels in
  :data:`~hyperbooth.world.oracles.ATTRIBUTE_CHANCE`);
- the raw subject cosine (the world's DINO / CLIP-I), shown beside, never alone: the identity oracle's cosine
  between a generated image and the prototype of its identity over held-out renders (:func:`identity_prototype`,
  :func:`subject_fidelity`);
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
from hyperbooth.world.identity import identity_class, make_identity
from hyperbooth.world.oracles import ATTRIBUTES, HEADS, Oracles, attribute_correct, attribute_labels, identity_views
from hyperbooth.world.render import render_identity, sample_pose
from hyperbooth.world.splits import identity_seeds

#: Identity retrieval: the identity and 7 other held-out identities of its class (chance 1/8).
RETRIEVAL_CANDIDATES = 8
#: The held-out identities of a class that distractors are drawn from (the first ones of the test split).
DISTRACTOR_POOL = 64


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
def identity_prototype(oracles: Oracles, identity_seed: int, views: int = 8, seed: int = 1, recolor: str | None = None) -> torch.Tensor:
    """The oracle's identity embedding of one identity: the normalized mean over ``views`` held-out renders in
    random contexts and poses (none of them the references), recoloured by ``recolor`` if given → ``(d,)``. Cached
    on ``oracles``."""
    key = (int(identity_seed), views, seed, recolor)
    if key not in oracles.prototypes:
        rng = np.random.default_rng([identity_seed, seed, 19])
        z = oracles.identity(identity_views([identity_seed], views, rng, recolor=recolor))  # (views, d)
        oracles.prototypes[key] = torch.nn.functional.normalize(z.mean(0), dim=-1)
    return oracles.prototypes[key]


_POOLS: dict[tuple, list[int]] = {}


def distractors(identity_seed: int, n: int = RETRIEVAL_CANDIDATES - 1, same_color: bool = False) -> list[int]:
    """``n`` other identities of ``identity_seed``'s class (and, with ``same_color``, of its primary colour), drawn
    from the first :data:`DISTRACTOR_POOL` such identities of the test split (also for a validation identity);
    deterministic in the seed, so every method is ranked against the same candidates."""
    identity = make_identity(identity_seed)
    key = (identity.class_name, identity.primary if same_color else None)
    if key not in _POOLS:
        pool, it = [], identity_seeds("test", 10**9)
        while len(pool) < DISTRACTOR_POOL:
            s = next(it)
            other = make_identity(s)
            if other.class_name == key[0] and (key[1] is None or other.primary == key[1]):
                pool.append(s)
        _POOLS[key] = pool
    pool = [s for s in _POOLS[key] if s != identity_seed]
    rng = np.random.default_rng([int(identity_seed), 23 if not same_color else 29])
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


@torch.no_grad()
def identity_retrieval(oracles: Oracles, images: torch.Tensor, identity_seeds: Sequence[int], recolors: Sequence[str | None] | None = None,
                       candidates: int = RETRIEVAL_CANDIDATES, same_color: bool = False) -> dict[str, torch.Tensor]:
    """Subject fidelity paired across identities, per image ``(B,)``. Under a recolour prompt (``recolors[i]``) every
    candidate's prototype is made of renders in that colour, so an image that follows the prompt is not penalised and
    the identity is told apart by its shape, secondary colour and pattern.

    - ``top1``: 1 where the image's identity-oracle embedding is closer (cosine) to its own identity's prototype than
      to each of ``candidates - 1`` other held-out identities of its class (:func:`distractors`); chance ``1/candidates``;
    - ``auc``: the fraction of those other identities it is closer to its own than to (ties count one half), the
      pairwise AUC; chance 0.5;
    - ``rank``: 1 + the number of other identities at least as close as its own (1 = retrieved).

    ``same_color``: the other candidates also share the identity's primary colour, so colour alone cannot decide and
    only shape, secondary colour and pattern can (a speckled blob of the right colour scores chance).
    """
    if len(identity_seeds) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(identity_seeds)} identity seeds")
    recolors = list(recolors) if recolors is not None else [None] * len(identity_seeds)
    if len(recolors) != len(identity_seeds):
        raise ValueError(f"{len(identity_seeds)} identity seeds but {len(recolors)} recolours")
    z = oracles.identity(images)  # (B, d), unit norm
    top1, auc, rank = [], [], []
    for i, (seed, recolor) in enumerate(zip(identity_seeds, recolors)):
        protos = torch.stack([identity_prototype(oracles, s, recolor=recolor) for s in (seed, *distractors(seed, candidates - 1, same_color))])  # (C, d)
        sims = protos @ z[i]  # (C,)
        own, others = sims[0], sims[1:]
        top1.append(float(bool((own > others).all())))
        rank.append(1 + int((others >= own).sum()))
        auc.append(float((own > others).double().mean() + 0.5 * (own == others).double().mean()))
    return {"top1": torch.tensor(top1), "auc": torch.tensor(auc), "rank": torch.tensor(rank)}


@torch.no_grad()
def attribute_recovery(oracles: Oracles, images: torch.Tensor, identity_seeds: Sequence[int], recolors: Sequence[str | None]) -> dict[str, torch.Tensor]:
    """Per image and attribute of :data:`~hyperbooth.world.oracles.ATTRIBUTES`: 1 where the attribute oracle reads
    the identity's own value from the image, 0 where not, NaN where the prompt hides it (the primary colour under a
    recolour prompt; a secondary colour the subject does not show); ``shape`` averages the shape parameters. All NaN
    when the oracle folder has no attribute classifier."""
    if oracles.attributes is None:
        return {name: torch.full((images.shape[0],), float("nan")) for name in ATTRIBUTES}
    labels: dict[str, list[int]] = {}
    for seed, recolor in zip(identity_seeds, recolors):
        for name, value in attribute_labels(make_identity(seed), recolor).items():
            labels.setdefault(name, []).append(value)
    return attribute_correct(oracles.attributes.predict(images), {k: torch.tensor(v) for k, v in labels.items()})


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
    """The figures of one set of generations: identity retrieval top-1 among 8 (``retrieval``, the headline, and its
    standard error ``retrieval_sem``), the pairwise AUC (``auc``), retrieval among 8 of the same class and primary
    colour (``retrieval_same_color``), attribute recovery (``attr_<attribute>``), the raw
    subject cosine (``subject``, ``subject_sem``), prompt fidelity (``prompt``: all named attributes right;
    ``prompt_<attribute>`` each), and per context type (``retrieval_<type>``, ``subject_<type>``, ``prompt_<type>``,
    :data:`~hyperbooth.world.contexts.CONTEXT_TYPES`).

    ``items[i]`` describes image ``i``: any object with ``identity_seed``, ``class_name`` and ``context`` (e.g. the
    table's :class:`~hyperbooth.world.protocol.EvalItem`).
    """
    seeds = [it.identity_seed for it in items]
    subject = subject_fidelity(oracles, images, seeds).float()
    recolors = [it.context.recolor for it in items]
    retrieval = identity_retrieval(oracles, images, seeds, recolors)
    same_color = identity_retrieval(oracles, images, seeds, recolors, same_color=True)
    attributes = attribute_recovery(oracles, images, seeds, recolors)
    prompt = prompt_fidelity(oracles, images, [it.class_name for it in items], [it.context for it in items])
    out = {
        "retrieval": float(retrieval["top1"].mean()), "retrieval_sem": standard_error(retrieval["top1"]),
        "auc": float(retrieval["auc"].mean()), "retrieval_same_color": float(same_color["top1"].mean()),
        **{f"attr_{name}": nanmean(v) for name, v in attributes.items()},
        "subject": float(subject.mean()), "subject_sem": standard_error(subject), "prompt": nanmean(prompt["context"]),
    }
    for name in HEADS:
        out[f"prompt_{name}"] = nanmean(prompt[name])
    for kind in ctx.CONTEXT_TYPES:
        mask = torch.tensor([kind in it.context.types for it in items])
        out[f"retrieval_{kind}"] = float(retrieval["top1"][mask].mean()) if mask.any() else float("nan")
        out[f"subject_{kind}"] = float(subject[mask].mean()) if mask.any() else float("nan")
        out[f"prompt_{kind}"] = nanmean(prompt["context"][mask])
    return out


@torch.no_grad()
def reference_metrics(oracles: Oracles, references: torch.Tensor, identity_seeds: Sequence[int]) -> dict[str, float]:
    """The subject figures of the references themselves (renders of each identity: the upper reference of every
    table): ``references (N, k, 3, H, W)`` of identities ``identity_seeds (N,)`` → retrieval, AUC, attribute
    recovery and the raw cosine, as :func:`personalization_metrics` names them."""
    images = references.flatten(0, 1)
    seeds = [s for s in identity_seeds for _ in range(references.shape[1])]
    retrieval = identity_retrieval(oracles, images, seeds)
    same_color = identity_retrieval(oracles, images, seeds, same_color=True)
    subject = subject_fidelity(oracles, images, seeds).float()
    attributes = attribute_recovery(oracles, images, seeds, [None] * len(seeds))
    return {
        "retrieval": float(retrieval["top1"].mean()), "retrieval_sem": standard_error(retrieval["top1"]), "auc": float(retrieval["auc"].mean()),
        "retrieval_same_color": float(same_color["top1"].mean()),
        **{f"attr_{name}": nanmean(v) for name, v in attributes.items()},
        "subject": float(subject.mean()), "subject_sem": standard_error(subject),
    }
