"""Measuring with the oracles: the world's base model (prompt fidelity per attribute, sample diversity) and
personalization (subject and prompt fidelity of the hypernetworks under CFG and HM-CFG, against the floor).

``hyperbooth world eval-base`` and ``hyperbooth world eval-personalization`` print these figures; the README's
tables come from them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.files import atomic_write
from hyperbooth.guidance import DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS, check_interval
from hyperbooth.sampling import DEFAULT_SCHEDULER
from hyperbooth.world import contexts as ctx
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.grids import to_uint8
from hyperbooth.world.datasets import labels_of
from hyperbooth.world.identity import identity_class
from hyperbooth.world.oracles import HEADS, Oracles, identity_views
from hyperbooth.world.splits import identity_seeds

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
    model: WorldBackbone,
    oracles: Oracles,
    num: int = 320,
    guidance_scale: float = 3.0,
    steps: int = 25,
    scheduler: str = DEFAULT_SCHEDULER,
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
    from hyperbooth.grids import grid, save_png as write_png

    rows: dict = {}
    for (class_name, context), image in generations:
        rows.setdefault(context.background, [])
        if len(rows[context.background]) < per_row:
            rows[context.background].append(image)
    order = [None] + [b for b in ctx.BACKGROUNDS if b in rows]
    write_png(grid([rows[b] for b in order if b in rows], upscale=3), path)


# -- personalization fidelity (shared by the demo, the hypernetwork table, the HM-CFG sweep, the baselines) -----


def reference_images(identity_seed: int, k: int, seed: int = 0, resolution: int = 32) -> torch.Tensor:
    """``k`` reference photos of one identity, as a user would take them: random DreamBench-World backgrounds
    (own colours, no hat) and poses; ``(k, 3, H, W)`` in [-1, 1]. Deterministic in ``(identity_seed, seed)``."""
    from hyperbooth.world.datasets import sample_context, to_tensor
    from hyperbooth.world.identity import make_identity
    from hyperbooth.world.render import render_identity, sample_pose

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
def subject_fidelity(oracles: Oracles, images: torch.Tensor, identity_seeds: list[int]) -> torch.Tensor:
    """Subject fidelity per image (the world's DINO / CLIP-I): the oracle identity cosine between generated image
    ``i`` and the prototype of identity ``identity_seeds[i]`` over held-out renders; ``(B,)`` in [-1, 1]."""
    if len(identity_seeds) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(identity_seeds)} identity seeds")
    protos = {s: identity_prototype(oracles, s) for s in set(identity_seeds)}
    z = oracles.identity(images)  # (B, d), unit norm
    return (z * torch.stack([protos[s] for s in identity_seeds])).sum(-1)


@torch.no_grad()
def prompt_fidelity(oracles: Oracles, images: torch.Tensor, classes: list[str], contexts: list[ctx.Context]) -> dict[str, torch.Tensor]:
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


# -- the personalization table: does the e2e hypernetwork work, and does HM-CFG beat CFG -------------------------
#
# Protocol (``hyperbooth world eval-personalization``): held-out identities (``identity_seeds("test", n)``), each
# with ``k`` references from :func:`reference_images` and a fixed set of evaluation contexts over every context type
# (:func:`personalization_items`). Every row generates the same (identity, context) list with the same initial
# noise, so rows differ only by the method: ``floor`` (base model, class prompt, CFG), ``cfg`` (personalized model,
# rare-token prompt, CFG) and ``hm-cfg`` (Hybrid-Model CFG with ``w_base``, ``w_pers``).

#: Context kinds of an identity's evaluation prompts, in order; prompt ``j`` of an identity has kind ``j mod 8``.
PERSONALIZATION_KINDS: tuple[str, ...] = (
    "plain",
    "background",
    "recolor",
    "accessory",
    "recolor+background",
    "accessory+background",
    "recolor+accessory+background",
    "background",
)
#: The context types a prompt can belong to (a combination belongs to each of its parts).
CONTEXT_TYPES: tuple[str, ...] = ("plain", "background", "recolor", "accessory")
ROW_KINDS: tuple[str, ...] = ("floor", "cfg", "hm-cfg")


@dataclass(frozen=True)
class EvalItem:
    """One generation of the protocol: subject ``subject`` (its index among the identities) in ``context``."""

    subject: int
    identity_seed: int
    class_name: str
    context: ctx.Context

    def prompt(self, token: str | None) -> str:
        return ctx.prompt_for(self.class_name, self.context, token=token)

    @property
    def types(self) -> tuple[str, ...]:
        c = self.context
        named = tuple(t for t, v in (("background", c.background), ("recolor", c.recolor), ("accessory", c.accessory)) if v is not None)
        return named or ("plain",)


def personalization_items(seeds: Sequence[int], prompts_per_identity: int = 6) -> list[EvalItem]:
    """The evaluation contexts, identity-major: identity ``i`` gets kinds ``PERSONALIZATION_KINDS[:prompts_per_identity]``
    (cycled); backgrounds and recolours are dealt in turn across all identities, so with 6 prompts every background
    occurs within 4 identities and every identity is shown both red and purple. Deterministic."""
    if prompts_per_identity < 1:
        raise ConfigError(f"prompts_per_identity={prompts_per_identity} must be at least 1")
    deal = {"background": list(ctx.BACKGROUNDS), "recolor": list(ctx.RECOLOR_WORDS), "accessory": list(ctx.ACCESSORY_PHRASES)}
    dealt = dict.fromkeys(deal, 0)
    items = []
    for i, seed in enumerate(seeds):
        class_name = identity_class(seed)
        for j in range(prompts_per_identity):
            fields = {}
            for part in PERSONALIZATION_KINDS[j % len(PERSONALIZATION_KINDS)].split("+"):
                if part in deal:
                    fields[part] = deal[part][dealt[part] % len(deal[part])]
                    dealt[part] += 1
            items.append(EvalItem(i, int(seed), class_name, ctx.Context(**fields)))
    return items


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a sampling method and its settings.

    ``kind``: ``"floor"`` (base model, CFG), ``"cfg"`` (personalized model, CFG) or ``"hm-cfg"`` (with ``w_base``,
    ``w_pers`` and the timestep interval ``pers_interval``, see :func:`hyperbooth.guidance.pers_active`). ``hypernet``: the
    label of the hypernetwork of a personalized row; ``refs``: its reference images per subject. ``class_prompt``:
    prompt with the class noun only (``"a toy …"``) instead of the rare-token form (``"a sks toy …"``); by default
    the floor does, the personalized rows do not.
    """

    kind: str
    hypernet: str | None = None
    refs: int = 1
    guidance_scale: float = 3.0
    w_base: float = DEFAULT_W_BASE
    w_pers: float = DEFAULT_W_PERS
    pers_interval: tuple[float, float] = DEFAULT_PERS_INTERVAL
    class_prompt: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ConfigError(f"unknown row kind {self.kind!r}; choose one of {', '.join(ROW_KINDS)}")
        if self.kind != "floor" and not self.hypernet:
            raise ConfigError(f"a {self.kind!r} row needs the label of a hypernetwork")
        if isinstance(self.refs, bool) or not isinstance(self.refs, int) or self.refs < 1:
            raise ConfigError(f"refs={self.refs!r} must be an integer of at least 1")
        for name in ("guidance_scale", "w_base", "w_pers"):
            check_weight(getattr(self, name), name)
        object.__setattr__(self, "pers_interval", check_interval(self.pers_interval))  # frozen: normalise to floats

    @property
    def token(self) -> str | None:
        uses_class_prompt = self.kind == "floor" if self.class_prompt is None else self.class_prompt
        return None if uses_class_prompt else ctx.RARE_TOKEN

    @property
    def label(self) -> str:
        if self.kind == "floor":
            text = f"floor cfg g={self.guidance_scale:g}"
        else:
            name = self.hypernet + (f" k={self.refs}" if self.refs != 1 else "")
            text = f"{name} cfg g={self.guidance_scale:g}" if self.kind == "cfg" else f"{name} hm-cfg w_base={self.w_base:g} w_pers={self.w_pers:g}"
            if self.kind == "hm-cfg":
                text += interval_tag(self.pers_interval)
        if self.class_prompt is not None and (self.token is None) != (self.kind == "floor"):
            text += " (class prompt)" if self.token is None else f" ({ctx.RARE_TOKEN} prompt)"
        return text


def interval_tag(interval) -> str:
    """`` t/T in [lo,hi]`` for an HM-CFG timestep interval other than every step (ASCII: any font draws it)."""
    interval = tuple(float(v) for v in interval)
    return "" if interval == DEFAULT_PERS_INTERVAL else " t/T in [{:g},{:g}]".format(*interval)


def check_weight(value, name: str) -> float:
    """A guidance weight: a finite number ≥ 0; the error names it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name}={value!r} must be a finite number ≥ 0")
    return v


def hm_cfg_pairs(w_base: Sequence[float], w_pers: Sequence[float], sweep: bool = False) -> list[tuple[float, float]]:
    """``(w_base, w_pers)`` pairs: every combination (``sweep``), else element by element (a single value pairs
    with every value of the other list)."""
    w_base = [check_weight(v, "w_base") for v in w_base]
    w_pers = [check_weight(v, "w_pers") for v in w_pers]
    if not w_base or not w_pers:
        raise ConfigError(f"w_base={w_base} and w_pers={w_pers} must both name at least one weight")
    if sweep:
        return list(itertools.product(w_base, w_pers))
    if len(w_base) == 1 or len(w_pers) == 1:
        return [(b, p) for b in w_base for p in w_pers]
    if len(w_base) != len(w_pers):
        raise ConfigError(f"w_base={w_base} and w_pers={w_pers} differ in length; give equally long lists, one value, or sweep the grid")
    return list(zip(w_base, w_pers))


def personalization_rows(
    hypernets: Sequence[str],
    refs: Sequence[int] = (1,),
    guidance_scales: Sequence[float] = (3.0,),
    hm_pairs: Sequence[tuple[float, float]] = ((DEFAULT_W_BASE, DEFAULT_W_PERS),),
    pers_intervals: Sequence[tuple[float, float]] = (DEFAULT_PERS_INTERVAL,),
) -> list[RowSpec]:
    """The rows of the table: the floor at each guidance scale, then for each hypernetwork and reference count its CFG
    rows (each guidance scale) and HM-CFG rows (each ``(w_base, w_pers)`` pair at each timestep interval)."""
    if not guidance_scales:
        raise ConfigError("guidance_scales must name at least one scale")
    if not refs:
        raise ConfigError("refs must name at least one reference count")
    rows = [RowSpec("floor", guidance_scale=g) for g in guidance_scales]
    for label in hypernets:
        for k in refs:
            rows += [RowSpec("cfg", label, k, guidance_scale=g) for g in guidance_scales]
            rows += [RowSpec("hm-cfg", label, k, w_base=b, w_pers=p, pers_interval=iv) for b, p in hm_pairs for iv in pers_intervals]
    return rows


def load_hypernetworks(folders: Sequence[str | os.PathLike], labels: Sequence[str] | None = None, base: WorldBackbone | None = None) -> dict:
    """label → :class:`~hyperbooth.methods.e2e.E2EHyperNetwork` for each folder (default labels: ``e2e`` for one,
    else the run's folder name); with ``base``, checks each emits the LoRA shapes of its UNet."""
    from hyperbooth.methods.e2e import E2EHyperNetwork

    folders = [Path(f) for f in folders]
    if not folders:
        raise ConfigError("name at least one hypernetwork folder")
    if labels is None or not list(labels):
        labels = ["e2e"] if len(folders) == 1 else [f"e2e:{(f.parent if f.name == 'hypernet' else f).name}" for f in folders]
    labels = list(labels)
    if len(labels) != len(folders):
        raise ConfigError(f"{len(labels)} labels {labels} for {len(folders)} hypernetwork folders; give one label per folder")
    if len(set(labels)) != len(labels) or not all(labels):
        raise ConfigError(f"hypernetwork labels {labels} must be distinct and non-empty")
    for folder in folders:
        if not folder.is_dir():
            raise CheckpointError(f"hypernetwork folder {folder} does not exist; train one with `hyperbooth train --config configs/e2e_world.yaml`")
    out = {}
    for label, folder in zip(labels, folders):
        out[label] = E2EHyperNetwork.from_pretrained(folder)
        if base is not None:
            check_hypernetwork(out[label], base, folder)
    return out


def multi_reference_variants(hypernets: Mapping, modes: Sequence[str]) -> dict:
    """label → hypernetwork for every hypernetwork and every way of combining several references (``"tokens"``:
    average the encoder tokens before the decoder; ``"mean_delta"``: average the predicted ΔW). The variants share
    their weights; only ``config.multi_reference`` differs. Labels become ``"<label>:<mode>"``."""
    import copy
    import dataclasses

    modes = list(dict.fromkeys(modes))
    for mode in modes:
        if mode not in ("tokens", "mean_delta"):
            raise ConfigError(f"multi-reference mode {mode!r} must be 'tokens' or 'mean_delta'")
    out = {}
    for label, hypernet in hypernets.items():
        for mode in modes:
            variant = copy.copy(hypernet)  # shares parameters and submodules
            variant.config = dataclasses.replace(hypernet.config, multi_reference=mode)
            out[f"{label}:{mode}"] = variant
    return out


def check_hypernetwork(hypernet, base: WorldBackbone, source) -> None:
    """Raise :class:`CheckpointError` naming ``source`` unless the hypernetwork emits the LoRA shapes of ``base``'s UNet."""
    from hyperbooth.lora.inject import target_shapes

    wanted = target_shapes(base.unet, hypernet.config.targets)
    if wanted != hypernet.target_shapes:
        first = sorted(set(wanted.items()) ^ set(hypernet.target_shapes.items()))[0]
        raise CheckpointError(f"hypernetwork {source} was built for another UNet than {base.path} (first difference: {first[0]!r})")


class DreamBoothLoRA:
    """The ceiling baseline as a row of the table: DreamBooth-LoRA (:func:`hyperbooth.methods.dreambooth_lora.finetune`, the diffusers
    recipe: rank 4 on the attention projections, lr 1e-4, batch 1, ``steps`` steps) fine-tuned on each subject's
    reference images, called like a hypernetwork plus the subjects' class names.

    ``cache``: a folder where each subject's LoRA is kept as ``dreambooth-<hash>.safetensors`` (the hash covers the
    reference pixels, the class and the settings) with its fine-tuning seconds in the header, so a rerun, or another
    table over the same identities, reuses it. ``seconds_per_subject`` holds the mean fine-tuning time of the last call
    (measured when the LoRA was made, read back from the header for cached ones)."""

    kind = "dreambooth-lora"

    def __init__(self, base: WorldBackbone, steps: int = 400, cache: str | os.PathLike | None = None, seed: int = 0, progress: bool = True):
        from hyperbooth.methods.dreambooth_lora import FinetuneConfig

        self.base, self.progress = base, progress
        self.config = FinetuneConfig(steps=_check_positive(steps, "dreambooth steps"), seed=seed)
        self.config.validate()
        self.cache = Path(cache) if cache is not None else None
        if self.cache is not None and self.cache.exists() and not self.cache.is_dir():
            raise ConfigError(f"DreamBooth-LoRA cache {str(self.cache)!r} is not a folder")
        self.seconds_per_subject = float("nan")

    def eval(self) -> DreamBoothLoRA:  # the hypernetworks' interface
        return self

    def _key(self, refs: torch.Tensor, class_name: str) -> str:
        import hashlib
        import json
        from dataclasses import asdict

        h = hashlib.sha256(refs.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(json.dumps({"class": class_name, "base": str(self.base.path), **asdict(self.config)}, sort_keys=True, default=str).encode())
        return h.hexdigest()[:20]

    def __call__(self, references: torch.Tensor, class_names: Sequence[str]):
        """``references (N, k, 3, H, W)`` → LoRAWeights with N subjects (each fine-tuned on its k images)."""
        from hyperbooth.methods.dreambooth_lora import METHOD, finetune
        from hyperbooth.lora import load_lora, save_lora, stack

        if references.ndim != 5 or len(class_names) != references.shape[0]:
            raise ConfigError(f"DreamBooth-LoRA needs references (N, k, 3, H, W) and N class names; got {tuple(references.shape)} and {len(class_names)}")
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
        subjects, seconds = [], []
        for i, class_name in enumerate(class_names):
            path = self.cache / f"dreambooth-{self._key(references[i], class_name)}.safetensors" if self.cache is not None else None
            if path is not None and path.is_file():
                loaded = load_lora(path, self.base.unet)
                weights, spent = loaded.unet, float(loaded.metadata.get("hyperbooth.finetune_seconds", "nan"))
            else:
                with torch.enable_grad():
                    weights, stats = finetune(self.base, references[i], class_name, self.config)
                spent = stats.seconds
                if path is not None:
                    save_lora(path, weights, models={"unet": self.base.unet}, method=METHOD, base_model=str(self.base.path),
                              extra_metadata={"hyperbooth.finetune_seconds": f"{spent:.4f}", "hyperbooth.finetune_steps": str(self.config.steps)})
            subjects.append(weights)
            seconds.append(spent)
            if self.progress:
                log.info("DreamBooth-LoRA subject %d/%d (%s): %.1f s", i + 1, len(class_names), class_name, spent)
        self.seconds_per_subject = sum(seconds) / len(seconds)
        return stack(subjects)


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else float("nan")


@torch.no_grad()
def personalization_metrics(oracles: Oracles, images: torch.Tensor, items: Sequence[EvalItem]) -> dict[str, float]:
    """Subject fidelity (``subject``, its standard error ``subject_sem``), prompt fidelity (``prompt``: all named
    attributes right; ``prompt_<attribute>`` each), and both per context type (``subject_<type>``,
    ``prompt_<type>``) of one row's images."""
    subject = subject_fidelity(oracles, images, [it.identity_seed for it in items]).float()
    prompt = prompt_fidelity(oracles, images, [it.class_name for it in items], [it.context for it in items])
    n = subject.numel()
    out = {
        "subject": float(subject.mean()),
        "subject_sem": float(subject.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "prompt": _nanmean(prompt["context"]),
    }
    for name in HEADS:
        out[f"prompt_{name}"] = _nanmean(prompt[name])
    for kind in CONTEXT_TYPES:
        mask = torch.tensor([kind in it.types for it in items])
        out[f"subject_{kind}"] = float(subject[mask].mean()) if mask.any() else float("nan")
        out[f"prompt_{kind}"] = _nanmean(prompt["context"][mask])
    return out


@torch.no_grad()
def generate_row(
    base: WorldBackbone,
    row: RowSpec,
    items: Sequence[EvalItem],
    weights=None,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 48,
    scheduler: str = DEFAULT_SCHEDULER,
) -> torch.Tensor:
    """The images of one row, ``(len(items), 3, H, W)``: chunks of ``batch_size`` prompts, one ``generate`` call each,
    chunk ``b`` seeded ``seed + b`` (the same noise in every row). ``weights``: LoRAWeights of all subjects (row
    ``i`` uses subject ``items[i].subject``); ignored by the floor."""
    from hyperbooth.generate import generate

    if row.kind != "floor" and weights is None:
        raise ConfigError(f"row {row.label!r} needs the subjects' LoRA weights")
    images = []
    for b, chunk in enumerate(_batched(items, batch_size)):
        prompts = [it.prompt(row.token) for it in chunk]
        if row.kind == "floor":
            x = generate(base, prompts, None, guidance_scale=row.guidance_scale, steps=steps, seed=seed + b, scheduler=scheduler)
        else:
            w = weights.select([it.subject for it in chunk])
            x = generate(
                base, prompts, w, guidance=row.kind, guidance_scale=row.guidance_scale, w_base=row.w_base, w_pers=row.w_pers,
                pers_interval=row.pers_interval, steps=steps, seed=seed + b, scheduler=scheduler,
            )
        images.append(x)
    return torch.cat(images)


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer of at least 1")
    return value


@torch.no_grad()
def evaluate_personalization(
    base: WorldBackbone,
    oracles: Oracles,
    hypernets: Mapping[str, torch.nn.Module] | torch.nn.Module,
    rows: Sequence[RowSpec] | None = None,
    num_identities: int = 50,
    prompts_per_identity: int = 6,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 48,
    scheduler: str = DEFAULT_SCHEDULER,
    tolerance: float = 0.02,
) -> dict:
    """Subject and prompt fidelity of every row on ``num_identities`` held-out identities (see the protocol above).

    ``hypernets``: label → hypernetwork (a single one is labelled ``e2e``); ``rows``: default the floor, e2e CFG and
    e2e HM-CFG at the generator's defaults. Returns ``{"rows": [...], "comparison": compare_hm_cfg(rows),
    "settings": {...}, "minutes": ...}``; each row a dict of its settings and figures, the first row the
    references' own subject fidelity (renders of the identity: the upper reference).
    """
    from hyperbooth.sampling import SCHEDULERS

    t_start = time.perf_counter()
    if isinstance(hypernets, torch.nn.Module):
        hypernets = {"e2e": hypernets}
    hypernets = dict(hypernets)
    rows = list(rows) if rows is not None else personalization_rows(list(hypernets))
    _check_positive(num_identities, "num_identities")
    _check_positive(prompts_per_identity, "prompts_per_identity")
    _check_positive(steps, "steps")
    _check_positive(batch_size, "batch_size")
    if not rows:
        raise ConfigError("rows must name at least one row")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    for row in rows:
        if row.kind != "floor" and row.hypernet not in hypernets:
            raise ConfigError(f"row {row.label!r} names hypernetwork {row.hypernet!r}; loaded: {', '.join(hypernets) or 'none'}")
    if len({row.label for row in rows}) != len(rows):
        raise ConfigError("rows repeat a setting; give each row once")

    seeds = list(identity_seeds("test", num_identities))
    items = personalization_items(seeds, prompts_per_identity)
    k_max = max([row.refs for row in rows if row.kind != "floor"], default=1)
    references = torch.stack([reference_images(s, k_max, resolution=base.resolution) for s in seeds])  # (N, k_max, 3, H, W)
    ref_subject = subject_fidelity(oracles, references.flatten(0, 1), [s for s in seeds for _ in range(k_max)]).float()
    nan = float("nan")
    results = [{
        "label": f"references (renders, k={k_max})", "kind": "references", "hypernet": None, "refs": k_max,
        "guidance_scale": None, "w_base": None, "w_pers": None, "images": int(ref_subject.numel()),
        "subject": float(ref_subject.mean()),
        "subject_sem": float(ref_subject.std() / math.sqrt(ref_subject.numel())) if ref_subject.numel() > 1 else nan,
        "prompt": nan, **{f"prompt_{h}": nan for h in HEADS},
        **{f"{m}_{t}": nan for t in CONTEXT_TYPES for m in ("subject", "prompt")},
        "seconds_per_image": nan, "hypernet_ms_per_subject": nan,
    }]

    weights, hyper_ms = {}, {}
    for label, k in dict.fromkeys((row.hypernet, row.refs) for row in rows if row.kind != "floor"):
        hypernet = hypernets[label].eval()
        refs = references[:, :k]  # (N, k, 3, H, W)
        if isinstance(hypernet, DreamBoothLoRA):  # fine-tuned per subject; its own clock
            weights[label, k] = hypernet(refs, [identity_class(s) for s in seeds]).detach()
            hyper_ms[label, k] = hypernet.seconds_per_subject * 1e3
            continue
        hypernet(refs[:1])  # warm-up, not timed
        t0 = time.perf_counter()
        weights[label, k] = hypernet(refs).detach()  # N subjects in one pass
        hyper_ms[label, k] = (time.perf_counter() - t0) * 1e3 / len(seeds)

    for r, row in enumerate(rows):
        t0 = time.perf_counter()
        images = generate_row(base, row, items, weights.get((row.hypernet, row.refs)), steps=steps, seed=seed, batch_size=batch_size, scheduler=scheduler)
        seconds = time.perf_counter() - t0
        personalized = row.kind != "floor"
        results.append({
            "label": row.label, "kind": row.kind,
            "hypernet": row.hypernet if personalized else None, "refs": row.refs if personalized else None,
            "guidance_scale": row.guidance_scale if row.kind != "hm-cfg" else None,
            "w_base": row.w_base if row.kind == "hm-cfg" else None, "w_pers": row.w_pers if row.kind == "hm-cfg" else None,
            "pers_interval": list(row.pers_interval) if row.kind == "hm-cfg" else None,
            "images": len(items),
            **personalization_metrics(oracles, images, items),
            "seconds_per_image": seconds / len(items),
            "hypernet_ms_per_subject": hyper_ms[row.hypernet, row.refs] if personalized else nan,
        })
        log.info("row %d/%d %s: subject %.3f prompt %.3f (%.0f s)", r + 1, len(rows), row.label, results[-1]["subject"], results[-1]["prompt"], seconds)
    return {
        "rows": results,
        "comparison": compare_hm_cfg(results, tolerance),
        "settings": {
            "num_identities": num_identities, "prompts_per_identity": prompts_per_identity, "images_per_row": len(items),
            "steps": steps, "seed": seed, "batch_size": batch_size, "scheduler": scheduler, "tolerance": tolerance,
            "identity_seeds": seeds, "base_model": str(base.path),
        },
        "minutes": (time.perf_counter() - t_start) / 60,
    }


def compare_hm_cfg(rows: Sequence[Mapping], tolerance: float = 0.02) -> list[dict]:
    """For each HM-CFG row, the personalized-CFG row (same hypernetwork and reference count) nearest in subject
    fidelity, and HM-CFG's prompt-fidelity gain over it, overall and on recolour prompts. ``matched``: the subject
    fidelities are within ``tolerance`` (the claim "at equal subject fidelity HM-CFG's prompt fidelity is higher"
    is judged on matched rows only); ``better``: matched and the prompt gain is positive."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"tolerance={tolerance!r} must be a finite number ≥ 0")
    out = []
    for hm in rows:
        if hm.get("kind") != "hm-cfg":
            continue
        candidates = [r for r in rows if r.get("kind") == "cfg" and r.get("hypernet") == hm.get("hypernet") and r.get("refs") == hm.get("refs") and math.isfinite(r["subject"])]
        nearest = min(candidates, key=lambda r: abs(r["subject"] - hm["subject"]), default=None)
        entry = {"hm_cfg": hm["label"], "cfg": None, "subject_gap": float("nan"), "prompt_gain": float("nan"), "recolor_prompt_gain": float("nan"), "matched": False, "better": False}
        if nearest is not None and math.isfinite(hm["subject"]):
            gap = hm["subject"] - nearest["subject"]
            gain = hm["prompt"] - nearest["prompt"]
            matched = abs(gap) <= tolerance + 1e-12
            entry.update(
                cfg=nearest["label"], subject_gap=gap, prompt_gain=gain,
                recolor_prompt_gain=hm.get("prompt_recolor", float("nan")) - nearest.get("prompt_recolor", float("nan")),
                matched=matched, better=bool(matched and gain > 0),
            )
        out.append(entry)
    return out


#: Settings that must agree for rows of several evaluation runs to sit in one table (a key one file lacks, e.g. one
#: written before the key existed, is not compared).
MERGE_KEYS: tuple[str, ...] = ("num_identities", "prompts_per_identity", "steps", "seed", "scheduler", "identity_seeds", "batch_size", "base_model", "oracles")
#: Row fields that are settings, not figures: they stay as they are when read back from JSON (figures: null → NaN).
SETTING_FIELDS: tuple[str, ...] = ("label", "kind", "hypernet", "refs", "guidance_scale", "w_base", "w_pers", "pers_interval")
_MISSING = object()


def _check_result(source: str, result) -> None:
    if not isinstance(result, Mapping) or not isinstance(result.get("settings"), Mapping) or not isinstance(result.get("rows"), list):
        raise ConfigError(f"{source}: not an eval-personalization result (it needs 'settings' and a list of 'rows')")
    for i, row in enumerate(result["rows"]):
        if not isinstance(row, Mapping) or any(k not in row for k in ("label", "kind", "subject", "prompt")):
            raise ConfigError(f"{source}: row {i} is not an eval-personalization row (it needs label, kind, subject, prompt)")


def hypernet_source(folder: str | os.PathLike) -> str:
    """What a row label stands for in a result's ``hypernet_folders``: the resolved folder and the first 16 hex digits
    of its weights file's SHA-256, so that a checkpoint retrained into the same folder counts as another model."""
    from hyperbooth.files import files_digest
    from hyperbooth.methods.base import WEIGHTS_NAME

    folder = Path(folder).resolve()
    return f"{folder} sha256:{files_digest([folder / WEIGHTS_NAME])}"


def select_hypernets(result: Mapping, labels: Sequence[str], source: str = "result") -> dict:
    """``result`` with only these hypernetwork labels' rows (and the floor and the references), e.g. to take the
    DreamBooth-LoRA rows of an older run next to a retrained model's; a label the result lacks is refused."""
    _check_result(source, result)
    present = {r.get("hypernet") for r in result["rows"]} - {None}
    missing = [label for label in labels if label not in present]
    if not labels or missing:
        raise ConfigError(f"{source}: no row of hypernetwork {(missing or [''])[0]!r} (labels there: {', '.join(sorted(map(str, present)))})")
    folders = {k: v for k, v in (result["settings"].get("hypernet_folders") or {}).items() if k in labels}
    return {**result, "rows": [r for r in result["rows"] if r.get("hypernet") is None or r.get("hypernet") in labels],
            "settings": {**result["settings"], "hypernet_folders": folders}}


def merge_results(results: Sequence[tuple[str, Mapping]], tolerance: float = 0.02, keep: Sequence[str] | None = None) -> dict:
    """Rows of several :func:`evaluate_personalization` runs (``(source, result)`` pairs, e.g. read from their
    ``--json`` files) as one result. The runs must share the protocol (:data:`MERGE_KEYS`) and, for a hypernetwork
    label they share, the hypernetwork; a row whose label an earlier run already has is dropped when its subject and
    prompt fidelity are the same and refused when they differ. ``keep``: only these hypernetwork labels' rows (and
    the floor and the references); a label no file has is refused. The HM-CFG comparison is recomputed over the
    merged rows. Order: references and floor, then each hypernetwork in order of appearance: CFG rows by scale, then
    HM-CFG rows by w_base (descending), w_pers, timestep interval."""
    if not results:
        raise ConfigError("no evaluation results to merge")
    first_source, first = results[0]
    rows: dict[str, Mapping] = {}
    folders: dict[str, str] = {}
    for source, result in results:
        _check_result(source, result)
        for key in MERGE_KEYS:
            mine, theirs = result["settings"].get(key, _MISSING), first["settings"].get(key, _MISSING)
            if mine is not _MISSING and theirs is not _MISSING and mine != theirs:
                raise ConfigError(f"{source}: setting {key!r} differs from {first_source} ({mine!r} vs {theirs!r}); only runs of one protocol can share a table")
        for label, folder in (result["settings"].get("hypernet_folders") or {}).items():
            if folders.setdefault(label, folder) != folder:
                raise ConfigError(
                    f"{source}: label {label!r} names hypernetwork {folder!r} here but {folders[label]!r} in an earlier file "
                    "(another folder, retrained weights, or a file written before labels carried a weights digest); "
                    "label the runs apart or take rows per file with FILE:LABELS"
                )
        for row in result["rows"]:
            row = {k: float("nan") if v is None and k not in SETTING_FIELDS else v for k, v in row.items()}  # JSON null → NaN
            old = rows.get(row["label"])
            if old is None:
                rows[row["label"]] = row
                continue
            same = all((math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 for a, b in ((old[k], row[k]) for k in ("subject", "prompt")))
            if not same:
                raise ConfigError(
                    f"{source}: row {row['label']!r} has other figures than in an earlier file (subject {row['subject']:.6g} vs "
                    f"{old['subject']:.6g}, prompt {row['prompt']:.6g} vs {old['prompt']:.6g}); label the runs apart"
                )
    kinds = {"references": 0, "floor": 1, "cfg": 2, "hm-cfg": 3}
    models = list(dict.fromkeys(r.get("hypernet") for r in rows.values()))

    def order(r):
        kind = kinds.get(r.get("kind"), 4)
        personalized = kind > 1
        interval = tuple(r.get("pers_interval") or DEFAULT_PERS_INTERVAL)
        return (personalized, models.index(r.get("hypernet")), 0 if personalized else kind, r.get("refs") or 0, kind,
                r.get("guidance_scale") or 0, -(r.get("w_base") or 0), r.get("w_pers") or 0, interval)

    settings = {**first["settings"], "tolerance": tolerance, "hypernet_folders": folders, "merged_from": [src for src, _ in results]}
    merged = {"rows": sorted(rows.values(), key=order), "settings": settings}
    if keep is not None:
        merged = select_hypernets(merged, keep, f"--keep over {', '.join(src for src, _ in results)}")
    return {**merged, "comparison": compare_hm_cfg(merged["rows"], tolerance)}


def _fmt(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def personalization_table(result: Mapping) -> str:
    """The rows as a Markdown table."""
    columns = (
        ("method", "label", None), ("subject", "subject", 3), ("± sem", "subject_sem", 3), ("prompt", "prompt", 3),
        ("background", "prompt_background", 3), ("recolour", "prompt_recolor", 3), ("hat", "prompt_accessory", 3),
        ("class", "prompt_class", 3), ("subject · recolour prompts", "subject_recolor", 3),
        ("prompt · recolour prompts", "prompt_recolor", 3), ("s / image", "seconds_per_image", 3),
        ("personalize ms / subject", "hypernet_ms_per_subject", 1),
    )
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "|".join("---" if c[2] is None else "---:" for c in columns) + "|"]
    for row in result["rows"]:
        lines.append("| " + " | ".join(str(row[key]) if digits is None else _fmt(row[key], digits) for _, key, digits in columns) + " |")
    return "\n".join(lines)


def comparison_table(comparison: Sequence[Mapping], tolerance: float = 0.02) -> str:
    """:func:`compare_hm_cfg`'s answer as Markdown, with a one-line verdict."""
    if not comparison:
        return "(no HM-CFG rows to compare)"
    lines = [
        f"| HM-CFG | nearest personalized CFG | Δ subject | Δ prompt | Δ prompt · recolour | within {tolerance:g} |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for c in comparison:
        lines.append(f"| {c['hm_cfg']} | {c['cfg'] or '–'} | {_fmt(c['subject_gap'], signed=True)} | {_fmt(c['prompt_gain'], signed=True)} | {_fmt(c['recolor_prompt_gain'], signed=True)} | {'yes' if c['matched'] else 'no'} |")
    matched = [c for c in comparison if c["matched"]]
    better = sum(c["better"] for c in matched)
    recolor_better = sum(c["recolor_prompt_gain"] > 0 for c in matched)
    lines.append("")
    lines.append(
        f"At equal subject fidelity (within {tolerance:g}): HM-CFG's prompt fidelity is above personalized CFG's in "
        f"{better} of {len(matched)} matched HM-CFG rows ({recolor_better} of {len(matched)} on recolour prompts); "
        f"{len(comparison) - len(matched)} of {len(comparison)} HM-CFG rows had no CFG row that close."
    )
    return "\n".join(lines)


def to_json(value):
    """Figures → JSON-safe values (NaN and infinities → null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207))


def plot_fidelity(rows: Sequence[Mapping], path, size: tuple[int, int] = (720, 540)):
    """Subject fidelity (x) vs prompt fidelity (y), drawn with PIL and written as PNG: one line per series (the
    floor and each personalized CFG over guidance scales; HM-CFG over ``w_pers`` at each ``w_base``), points
    labelled by their setting, the references' subject fidelity as a dashed vertical line."""
    from PIL import Image, ImageDraw, ImageFont

    points = [r for r in rows if r.get("kind") in ROW_KINDS and math.isfinite(r["subject"]) and math.isfinite(r["prompt"])]
    if not points:
        raise ConfigError("no row has finite subject and prompt fidelity to plot")
    series: dict[str, list] = {}
    for r in points:
        model = f"{r.get('hypernet')}" + (f" k={r['refs']}" if r.get("refs", 1) != 1 else "")
        if r["kind"] == "floor":
            name, order, tag = "floor (base, CFG)", r["guidance_scale"], f"g={r['guidance_scale']:g}"
        elif r["kind"] == "cfg":
            name, order, tag = f"{model} CFG", r["guidance_scale"], f"g={r['guidance_scale']:g}"
        else:
            when = interval_tag(r.get("pers_interval") or DEFAULT_PERS_INTERVAL)
            name, order, tag = f"{model} HM-CFG w_base={r['w_base']:g}{when}", r["w_pers"], f"{r['w_base']:g}/{r['w_pers']:g}"
        series.setdefault(name, []).append((order, r["subject"], r["prompt"], tag))
    refs = [r["subject"] for r in rows if r.get("kind") == "references" and math.isfinite(r["subject"])]
    xs = [p[1] for s in series.values() for p in s]
    ys = [p[2] for s in series.values() for p in s]
    x0, x1 = min(xs), max(xs)
    off_axis = [x for x in refs if x > x1 + max(0.3, x1 - x0)]  # far to the right: named, not drawn to scale
    refs = [x for x in refs if x not in off_axis]
    xs += refs
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = max(0.02, 0.08 * (x1 - x0)), max(0.02, 0.08 * (y1 - y0))
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    w, h = size
    left, right, top, bottom = 60, 20, 20 + 12 * len(series), 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):  # ticks
        tx, ty = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        gx, _ = px(tx, y0)
        _, gy = px(x0, ty)
        draw.line([gx, h - bottom, gx, h - bottom + 4], fill="black")
        draw.text((gx - 12, h - bottom + 6), f"{tx:.2f}", fill="black", font=font)
        draw.line([left - 4, gy, left, gy], fill="black")
        draw.text((left - 34, gy - 5), f"{ty:.2f}", fill="black", font=font)
    draw.text(((w - 120) / 2, h - 18), "subject fidelity", fill="black", font=font)
    draw.text((w - right - 250, h - 18), "points: g = CFG scale, a/b = w_base/w_pers", fill=(120, 120, 120), font=font)
    draw.text((4, 4), "prompt fidelity", fill="black", font=font)
    for i, x in enumerate(off_axis):
        draw.text((w - right - 190, top + 4 + 12 * i), f"references: {x:.3f} (off the axis) ->", fill=(120, 120, 120), font=font)
    for x in refs:
        gx, _ = px(x, y0)
        for y in range(top, h - bottom, 8):
            draw.line([gx, y, gx, min(y + 4, h - bottom)], fill=(120, 120, 120))
        draw.text((gx + 3 if gx < w - right - 70 else gx - 63, top + 2), "references", fill=(120, 120, 120), font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = (110, 110, 110) if name.startswith("floor") else _PALETTE[i % len(_PALETTE)]
        pts = sorted(pts)
        coords = [px(p[1], p[2]) for p in pts]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for (cx, cy), p in zip(coords, pts):
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            draw.text((cx + 4, cy - 11), p[3], fill=color, font=font)
        draw.rectangle([left + 110, 4 + 12 * i + 3, left + 116, 4 + 12 * i + 9], fill=color)
        draw.text((left + 120, 4 + 12 * i), name, fill="black", font=font)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
