"""The world's personalization table (``hyperbooth world eval-personalization``): any personalizer, under CFG and
HM-CFG, against the floor, judged by the oracles.

    personalizers = load_personalizers(["runs/a/hypernet"], ["a"], base)     # any registered method's folder
    rows = personalization_rows(list(personalizers), refs=[1, 3])
    result = evaluate_personalization(base, oracles, personalizers, rows, num_identities=50)

Each personalizer (a :class:`~hyperbooth.methods.base.Personalizer` of any registered method, or its folder) goes
through the interface alone: ``personalize(references, backbone, class_names)`` gives every subject's LoRA (class
names where the method ``needs_class_names``), timed by the wall clock after one warm-up call, or by the method's
own clock where it keeps one (``seconds_per_subject``, e.g. a per-subject fine-tune: no warm-up, its seconds are
reported). The protocol is in :mod:`hyperbooth.world.protocol`, the figures in :mod:`hyperbooth.world.fidelity`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hyperbooth.backbones.base import Backbone, as_components
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.methods import Personalizer, load
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS
from hyperbooth.world.comparison import DEFAULT_TOLERANCE, compare_hm_cfg
from hyperbooth.world.contexts import CONTEXT_TYPES
from hyperbooth.world.eval_base import batched
from hyperbooth.world.fidelity import personalization_metrics, reference_images, reference_metrics
from hyperbooth.world.identity import identity_class
from hyperbooth.world.oracles import HEADS, Oracles
from hyperbooth.world.protocol import EvalItem, RowSpec, check_positive, personalization_items, personalization_rows
from hyperbooth.world.splits import identity_seeds

log = logging.getLogger(__name__)

#: What may stand for a personalizer: the object, or its folder (``hyperbooth.methods.load``).
PersonalizerLike = Personalizer | str | os.PathLike


def default_labels(personalizers: Sequence[Personalizer], folders: Sequence[str | os.PathLike | None]) -> list[str]:
    """Row labels when none are given: the method's name for a single personalizer (``e2e``), else
    ``<method>:<run folder name>`` (the folder's parent where the folder is called ``hypernet``)."""
    if len(personalizers) == 1:
        return [personalizers[0].method]
    labels = []
    for i, (p, folder) in enumerate(zip(personalizers, folders)):
        if folder is None:
            labels.append(f"{p.method}:{i}")
        else:
            folder = Path(folder)
            labels.append(f"{p.method}:{(folder.parent if folder.name == 'hypernet' else folder).name}")
    return labels


def load_personalizers(folders: Sequence[str | os.PathLike], labels: Sequence[str] | None = None, base: WorldBackbone | None = None) -> dict[str, Personalizer]:
    """label → the personalizer saved in each folder (any registered method); with ``base``, checks each emits the
    LoRA shapes of its UNet. Labels: one per folder, distinct; default :func:`default_labels`."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ConfigError("name at least one personalizer folder")
    if labels is not None and list(labels):
        labels = list(labels)
        if len(labels) != len(folders):
            raise ConfigError(f"{len(labels)} labels {labels} for {len(folders)} personalizer folders; give one label per folder")
        check_labels(labels)
    loaded = [load(folder) for folder in folders]  # an unknown method or a missing file names the folder
    if base is not None:
        for folder, personalizer in zip(folders, loaded):
            personalizer.check_backbone(base, folder)
    labels = list(labels) if labels else default_labels(loaded, folders)
    check_labels(labels)
    return dict(zip(labels, loaded))


def check_labels(labels: Sequence[str]) -> None:
    if len(set(labels)) != len(labels) or not all(labels):
        raise ConfigError(f"personalizer labels {list(labels)} must be distinct and non-empty")


def multi_reference_variants(personalizers: Mapping[str, Personalizer], modes: Sequence[str]) -> dict[str, Personalizer]:
    """label → personalizer for every personalizer and every way of combining several references its config offers
    (``config.multi_reference``; e2e: ``"tokens"`` averages the encoder tokens before the decoder, ``"mean_delta"``
    the predicted ΔW). The variants share their weights; only ``config.multi_reference`` differs, checked by the
    config's own ``validate``. Labels become ``"<label>:<mode>"``."""
    modes = list(dict.fromkeys(modes))
    out = {}
    for label, personalizer in personalizers.items():
        config = personalizer.config
        if not (dataclasses.is_dataclass(config) and "multi_reference" in {f.name for f in dataclasses.fields(config)}):
            raise ConfigError(f"{label}: method {personalizer.method!r} has no multi_reference setting to vary")
        for mode in modes:
            variant_config = dataclasses.replace(config, multi_reference=mode)
            variant_config.validate()
            variant = copy.copy(personalizer)  # shares parameters and submodules
            variant.config = variant_config
            out[f"{label}:{mode}"] = variant
    return out


def has_own_clock(personalizer: Personalizer) -> bool:
    """Whether the method keeps its own clock (``seconds_per_subject``, the mean of its last ``personalize`` call):
    a per-subject fine-tune reports its fine-tuning time, also for LoRAs it reads back from its cache, and is not
    called twice (no warm-up)."""
    return personalizer.own_clock


@torch.no_grad()
def personalize_subjects(personalizer: Personalizer, references: torch.Tensor, class_names: Sequence[str],
                         backbone: Backbone) -> tuple[dict[str, LoRAWeights], float]:
    """Every subject's LoRA through the Personalizer interface, and the milliseconds per subject.

    ``references (N, k, 3, H, W)`` → (component → LoRAWeights with N subjects, ms per subject). Class names are
    passed where the method ``needs_class_names``. Timing: the method's own clock where it keeps one
    (:func:`has_own_clock`), else the wall time of one call for all N subjects after an untimed warm-up call."""
    names = list(class_names) if personalizer.needs_class_names else None
    if has_own_clock(personalizer):
        weights = personalizer.personalize(references, backbone, class_names=names)
        return {c: w.detach() for c, w in as_components(weights).items()}, personalizer.seconds_per_subject * 1e3
    personalizer.personalize(references[:1], backbone, class_names=names[:1] if names else None)  # warm-up, not timed
    t0 = time.perf_counter()
    weights = personalizer.personalize(references, backbone, class_names=names)  # N subjects in one call
    ms = (time.perf_counter() - t0) * 1e3 / references.shape[0]
    return {c: w.detach() for c, w in as_components(weights).items()}, ms


@torch.no_grad()
def generate_row(
    base: WorldBackbone,
    row: RowSpec,
    items: Sequence[EvalItem],
    weights: Mapping[str, LoRAWeights] | LoRAWeights | None = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 48,
    scheduler: str = DEFAULT_SCHEDULER,
) -> torch.Tensor:
    """The images of one row, ``(len(items), 3, H, W)``: chunks of ``batch_size`` prompts, one ``generate`` call each,
    chunk ``b`` seeded ``seed + b`` (the same noise in every row). ``weights``: the LoRAs of all subjects (a UNet
    LoRA or LoRAs by component; row ``i`` uses subject ``items[i].subject``); ignored by the floor and the described
    row, which sample the base model with CFG."""
    parts = as_components(weights)
    if row.personalized and not parts:
        raise ConfigError(f"row {row.label!r} needs the subjects' LoRA weights")
    images = []
    for b, chunk in enumerate(batched(items, batch_size)):
        prompts = [it.prompt(row.token, described=row.described) for it in chunk]
        if not row.personalized:
            x = generate(base, prompts, None, guidance="cfg", guidance_scale=row.guidance_scale, steps=steps, seed=seed + b, scheduler=scheduler)
        else:
            w = {c: lora.select([it.subject for it in chunk]) for c, lora in parts.items()}
            x = generate(
                base, prompts, w, guidance=row.kind, guidance_scale=row.guidance_scale, w_base=row.w_base, w_pers=row.w_pers,
                pers_interval=row.pers_interval, steps=steps, seed=seed + b, scheduler=scheduler,
            )
        images.append(x)
    return torch.cat(images)


def _resolve(personalizers: Mapping[str, PersonalizerLike] | Personalizer, base: WorldBackbone) -> dict[str, Personalizer]:
    """label → personalizer object (folders loaded), each checked against ``base``; a lone object is labelled by its
    method's name."""
    if isinstance(personalizers, Personalizer):
        personalizers = {personalizers.method: personalizers}
    out = {}
    for label, p in dict(personalizers).items():
        if isinstance(p, (str, os.PathLike)):
            folder, p = p, load(p)
            p.check_backbone(base, folder)
        elif not isinstance(p, Personalizer):
            raise ConfigError(f"{label!r}: {type(p).__name__} is neither a Personalizer nor a personalizer folder")
        else:
            p.check_backbone(base)
        out[label] = p
    check_labels(list(out))
    return out


@torch.no_grad()
def evaluate_personalization(
    base: WorldBackbone,
    oracles: Oracles,
    personalizers: Mapping[str, PersonalizerLike] | Personalizer,
    rows: Sequence[RowSpec] | None = None,
    num_identities: int = 50,
    prompts_per_identity: int = 6,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 48,
    scheduler: str = DEFAULT_SCHEDULER,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict:
    """Subject fidelity (retrieval top-1 among 8, AUC, attribute recovery, raw cosine) and prompt fidelity of every
    row on ``num_identities`` held-out identities (see :mod:`hyperbooth.world.protocol`).

    ``personalizers``: label → personalizer of any registered method, or its folder (a single object is labelled by
    its method's name); ``rows``: default the floor, CFG and HM-CFG of each at the generator's defaults. Returns
    ``{"rows": [...], "comparison": compare_hm_cfg(rows), "settings": {...}, "minutes": ...}``; each row a dict of its
    settings and figures, the first row the references' own subject fidelity (renders of the identity: the upper
    reference, scored the same way). ``settings["methods"]``: label → the method's registered name.
    """
    t_start = time.perf_counter()
    personalizers = _resolve(personalizers, base)
    rows = list(rows) if rows is not None else personalization_rows(list(personalizers))
    check_positive(num_identities, "num_identities")
    check_positive(prompts_per_identity, "prompts_per_identity")
    check_positive(steps, "steps")
    check_positive(batch_size, "batch_size")
    if not rows:
        raise ConfigError("rows must name at least one row")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    for row in rows:
        if row.personalized and row.hypernet not in personalizers:
            raise ConfigError(f"row {row.label!r} names personalizer {row.hypernet!r}; loaded: {', '.join(personalizers) or 'none'}")
    if len({row.label for row in rows}) != len(rows):
        raise ConfigError("rows repeat a setting; give each row once")

    seeds = list(identity_seeds("test", num_identities))
    classes = [identity_class(s) for s in seeds]
    items = personalization_items(seeds, prompts_per_identity)
    k_max = max([row.refs for row in rows if row.personalized], default=1)
    references = torch.stack([reference_images(s, k_max, resolution=base.resolution) for s in seeds])  # (N, k_max, 3, H, W)
    nan = float("nan")
    results = [{
        "label": f"references (renders, k={k_max})", "kind": "references", "hypernet": None, "method": None, "refs": k_max,
        "guidance_scale": None, "w_base": None, "w_pers": None, "images": references.shape[0] * k_max,
        **reference_metrics(oracles, references, seeds),
        "prompt": nan, **{f"prompt_{h}": nan for h in HEADS},
        **{f"{m}_{t}": nan for t in CONTEXT_TYPES for m in ("retrieval", "subject", "prompt")},
        "seconds_per_image": nan, "hypernet_ms_per_subject": nan,
    }]

    weights, ms = {}, {}
    for label, k in dict.fromkeys((row.hypernet, row.refs) for row in rows if row.personalized):
        personalizer = personalizers[label].eval()
        weights[label, k], ms[label, k] = personalize_subjects(personalizer, references[:, :k], classes, base)

    for r, row in enumerate(rows):
        t0 = time.perf_counter()
        images = generate_row(base, row, items, weights.get((row.hypernet, row.refs)), steps=steps, seed=seed, batch_size=batch_size, scheduler=scheduler)
        seconds = time.perf_counter() - t0
        p = row.personalized
        results.append({
            "label": row.label, "kind": row.kind,
            "hypernet": row.hypernet if p else None, "method": personalizers[row.hypernet].method if p else None, "refs": row.refs if p else None,
            "guidance_scale": row.guidance_scale if row.kind != "hm-cfg" else None,
            "w_base": row.w_base if row.kind == "hm-cfg" else None, "w_pers": row.w_pers if row.kind == "hm-cfg" else None,
            "pers_interval": list(row.pers_interval) if row.kind == "hm-cfg" else None,
            "images": len(items),
            **personalization_metrics(oracles, images, items),
            "seconds_per_image": seconds / len(items),
            "hypernet_ms_per_subject": ms[row.hypernet, row.refs] if p else nan,
        })
        log.info("row %d/%d %s: retrieval %.3f AUC %.3f prompt %.3f (%.0f s)", r + 1, len(rows), row.label, results[-1]["retrieval"],
                 results[-1]["auc"], results[-1]["prompt"], seconds)
    used = dict.fromkeys(row.hypernet for row in rows if row.personalized)
    return {
        "rows": results,
        "comparison": compare_hm_cfg(results, tolerance),
        "settings": {
            "num_identities": num_identities, "prompts_per_identity": prompts_per_identity, "images_per_row": len(items),
            "steps": steps, "seed": seed, "batch_size": batch_size, "scheduler": scheduler, "tolerance": tolerance,
            "identity_seeds": seeds, "base_model": str(base.path), "methods": {label: personalizers[label].method for label in used},
        },
        "minutes": (time.perf_counter() - t_start) / 60,
    }
