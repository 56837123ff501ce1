"""`hyperbooth demo`: the quick start's main job, on the shipped DreamBench-World models (CPU, a few minutes).

Four held-out identities are personalized through the Personalizer interface (any registered method; default the
shipped e2e hypernetwork) from 1 and from 3 reference images, then generated under six DreamBench-World prompts
(backgrounds, a recolour, the red hat) with CFG and with HM-CFG. It writes one captioned grid (rows: identity ×
references × guidance, the references first; columns: prompts; each image captioned with its identity-retrieval
rank among 8) and prints, per (references, guidance), the oracles' identity retrieval top-1 among 8, pairwise AUC,
retrieval among 8 of the same class and primary colour, raw cosine and prompt fidelity (:mod:`hyperbooth.world.fidelity`, the world table's code path) beside the base
model's floor, the time per subject and the sampling time per image. A short extra checks that the LoRA files load in
diffusers (tiny SD-1.5 pipeline, random weights).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperbooth.generate import generate
from hyperbooth.grids import captioned_grid, save_png, to_uint8
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.lora import DEFAULT_UNET_TARGETS, apply_lora, load_lora, save_lora, target_shapes
from hyperbooth.lora.weights import LoRAWeights, stack
from hyperbooth.personalize import personalize
from hyperbooth.sampling import DEFAULT_STEPS
from hyperbooth.world import contexts as ctx
from hyperbooth.world.fidelity import RETRIEVAL_CANDIDATES, identity_retrieval, nanmean, prompt_fidelity, reference_images, subject_fidelity
from hyperbooth.world.identity import identity_class
from hyperbooth.world.splits import identity_seeds

log = logging.getLogger(__name__)

DEMO_CONTEXTS = (
    ctx.Context(background="snow"),
    ctx.Context(background="beach"),
    ctx.Context(background="city"),
    ctx.Context(background="water"),
    ctx.Context(recolor="purple"),
    ctx.Context(accessory="red_hat"),
)
REF_COUNTS = (1, 3)
GUIDANCES = ("cfg", "hm-cfg")
GRID_NAME = "demo_grid.png"


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table: means over identities × prompts."""

    refs: int  # 0 = the base model, no personalization (the floor)
    guidance: str
    retrieval: float  # identity retrieval top-1 among 8 same-class identities (chance 0.125): the headline
    auc: float  # pairwise AUC against those 7 (chance 0.5)
    retrieval_same_color: float  # top-1 among 8 of the same class and primary colour: colour alone cannot decide it
    subject_fidelity: float  # the raw oracle cosine to the identity's prototype, beside the paired figures
    prompt_fidelity: float
    personalize_ms: float  # per subject; NaN for the floor
    seconds_per_image: float


def context_title(context: ctx.Context) -> str:
    """A column title: the prompt with the class left open, e.g. ``"a purple sks … in the snow"``."""
    words = ["a", ctx.RECOLOR_WORDS.get(context.recolor or "", ""), "sks …", ctx.ACCESSORY_PHRASES.get(context.accessory or "", ""), ctx.BACKGROUNDS.get(context.background or "", "")]
    return " ".join(w for w in words if w)


@torch.no_grad()
def run_demo(
    base,
    personalizer,
    oracles,
    out: Path,
    identities: int = 4,
    ref_counts: tuple[int, ...] = REF_COUNTS,
    contexts: tuple[ctx.Context, ...] = DEMO_CONTEXTS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    floor: bool = True,
) -> tuple[list[DemoRow], Path]:
    """Personalize ``identities`` held-out identities from each of ``ref_counts`` references, generate every
    (identity, prompt) with CFG and HM-CFG (one :func:`generate` call of ``identities · len(contexts)`` rows each),
    judge with the oracles, and write the captioned grid to ``out / GRID_NAME``. Returns (table rows, grid path).
    """
    seeds = list(identity_seeds("test", identities))
    classes = [identity_class(s) for s in seeds]
    # batch rows, identity-major: row i·P + j = identity i under context j
    row_seeds = [s for s in seeds for _ in contexts]
    row_classes = [c for c in classes for _ in contexts]
    row_contexts = [c for _ in seeds for c in contexts]
    prompts = [ctx.prompt_for(c, context, token=ctx.RARE_TOKEN) for c, context in zip(row_classes, row_contexts)]
    k_max = max(ref_counts)
    refs = torch.stack([reference_images(s, k_max, seed=seed, resolution=base.resolution) for s in seeds])  # (I, k_max, 3, H, W)
    settings = {"guidance_scale": DEFAULT_GUIDANCE_SCALE, "w_base": DEFAULT_W_BASE, "w_pers": DEFAULT_W_PERS, "steps": steps, "seed": seed}

    runs, times = {}, {}  # (refs, guidance) → (images (I·P, 3, H, W), seconds per image); refs → ms per subject
    if floor:
        generate(base, prompts, None, guidance="cfg", **{**settings, "steps": 1})  # warm-up, not timed
        t0 = time.perf_counter()
        runs[0, "base cfg"] = (generate(base, prompts, None, guidance="cfg", **settings), (time.perf_counter() - t0) / len(prompts))
    for k in ref_counts:
        personalize(refs[0, :k], personalizer, base, classes[0])  # warm-up, not timed
        subjects, ms = [], []
        for i in range(len(seeds)):  # one pass per subject, as a user would run it
            w, t = personalize(refs[i, :k], personalizer, base, classes[i])
            subjects.append(w)
            ms.append(t)
        times[k] = float(np.mean(ms))
        weights = stack(subjects).select([i for i in range(len(seeds)) for _ in contexts])  # (I·P subjects)
        for guidance in GUIDANCES:
            if k == ref_counts[0]:  # a batch shape's first call builds its kernels: one untimed step first
                generate(base, prompts, weights, guidance=guidance, **{**settings, "steps": 1})
            t0 = time.perf_counter()
            images = generate(base, prompts, weights, guidance=guidance, **settings)
            runs[k, guidance] = (images, (time.perf_counter() - t0) / len(prompts))

    # the oracles judge every run in one pass (identity prototypes are rendered once)
    keys, n = list(runs), len(prompts)
    all_images = torch.cat([runs[key][0] for key in keys])
    sf_all = subject_fidelity(oracles, all_images, row_seeds * len(keys)).view(len(keys), n)
    found = identity_retrieval(oracles, all_images, row_seeds * len(keys), [c.recolor for c in row_contexts] * len(keys))
    top1_all, auc_all, rank_all = (found[name].view(len(keys), n) for name in ("top1", "auc", "rank"))
    same_all = identity_retrieval(oracles, all_images, row_seeds * len(keys), [c.recolor for c in row_contexts] * len(keys), same_color=True)["top1"].view(len(keys), n)
    pf_all = prompt_fidelity(oracles, all_images, row_classes * len(keys), row_contexts * len(keys))["context"].view(len(keys), n)
    table, results = [], {}
    for key, sf, top1, auc, same, rank, pf in zip(keys, sf_all, top1_all, auc_all, same_all, rank_all, pf_all):
        k, guidance = key
        results[key] = (runs[key][0], rank, pf)
        table.append(DemoRow(k, guidance, float(top1.mean()), float(auc.mean()), float(same.mean()), float(sf.mean()), nanmean(pf), times.get(k, float("nan")), runs[key][1]))
        log.info("%d reference(s), %s: retrieval %.3f, AUC %.3f, prompt %.3f", k, guidance, table[-1].retrieval, table[-1].auc, table[-1].prompt_fidelity)

    # grid: rows identity × refs × guidance; the reference images first, then one column per prompt
    ref_images = to_uint8(refs.flatten(0, 1)).reshape(len(seeds), k_max, *refs.shape[-2:], 3)
    cells, captions = [], []
    p = len(contexts)
    for i, (s, c) in enumerate(zip(seeds, classes)):
        for k in ref_counts:
            for guidance in GUIDANCES:
                images, rank, pf = results[k, guidance]
                generated = to_uint8(images[i * p : (i + 1) * p])
                cells.append([ref_images[i, j] if j < k else None for j in range(k_max)] + list(generated))
                label = [f"{c} #{s}\n{k} ref{'s' if k > 1 else ''}, {guidance}"] + [""] * (k_max - 1)
                verdicts = [f"id rank {int(rank[i * p + j])}/{RETRIEVAL_CANDIDATES} {_verdict(pf[i * p + j])}" for j in range(p)]
                captions.append(label + verdicts)
    titles = ["references"] + [""] * (k_max - 1) + [context_title(c) for c in contexts]
    path = save_png(captioned_grid(cells, captions, titles), Path(out) / GRID_NAME)
    return table, path


def _verdict(value: torch.Tensor) -> str:
    v = float(value)
    return "" if math.isnan(v) else ("prompt ok" if v == 1 else "prompt missed")


def format_table(rows: list[DemoRow]) -> str:
    """The demo's table as aligned text."""
    head = ("refs", "guidance", "retrieval top-1 of 8", "AUC", "same colour", "cosine", "prompt fidelity", "personalize ms", "s / image")
    lines = [head]
    for r in rows:
        ms = "-" if math.isnan(r.personalize_ms) else f"{r.personalize_ms:.1f}"
        lines.append((str(r.refs) if r.refs else "-", r.guidance, f"{r.retrieval:.3f}", f"{r.auc:.3f}", f"{r.retrieval_same_color:.3f}", f"{r.subject_fidelity:.3f}",
                      f"{r.prompt_fidelity:.3f}", ms, f"{r.seconds_per_image:.3f}"))
    lines.append(("", "chance", f"{1 / RETRIEVAL_CANDIDATES:.3f}", "0.500", f"{1 / RETRIEVAL_CANDIDATES:.3f}", "", "", "", ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(wd) if i != 1 else cell.ljust(wd) for i, (cell, wd) in enumerate(zip(line, widths))) for line in lines)


def interop_check(out: Path, seed: int) -> list[tuple[str, str]]:
    """Export a random LoRA for a tiny SD-1.5 pipeline in both layouts and load it with diffusers'
    ``load_lora_weights``: the UNet's output must match hyperbooth's own injection."""
    # heavy (diffusers' SD pipeline stack, transformers' CLIP), needed by this optional check only
    from diffusers import StableDiffusionPipeline

    from hyperbooth.tiny import tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline(Path(tmp) / "tiny-sd15", seed=seed), safety_checker=None)
    unet = pipe.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    lora = LoRAWeights.random(target_shapes(unet, DEFAULT_UNET_TARGETS), rank=4, std=0.1, generator=g)
    x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.full((1,), 500)
    cond = torch.randn(1, 6, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), apply_lora(unet, lora, mode="shared"):
        ours = unet(x_t, t, encoder_hidden_states=cond).sample
    rows = []
    for fmt in ("diffusers", "kohya"):
        path = save_lora(out / f"subject0_{fmt}.safetensors", lora, fmt, models={"unet": unet}, method="random", base_model="tiny-sd15")
        load_lora(path, unet)  # our importer checks it against the model
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            theirs = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        pipe.unload_lora_weights()
        rows.append((f"{fmt} file via diffusers load_lora_weights", f"max |Δε| vs hyperbooth = {(theirs - ours).abs().max():.3e}  ({path})"))
    return rows
