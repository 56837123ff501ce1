"""Time vs subject fidelity: the per-subject fine-tunes (the ceiling) against one hypernetwork pass; also the tool
that tunes the ceiling (``--split val``: validation identities) until its curve is flat.

On M DreamBench-World identities (``--split test``: held out; ``val``: for tuning), with k reference images each
(``reference_images``; k = 3 as in DreamBooth), a fine-tune is run per identity and evaluated at increasing step
counts (0, 25, 50, 100, 200, … up to ``--max-steps``): DreamBooth-LoRA (``--method lora``,
:mod:`hyperbooth.methods.dreambooth_lora`, the diffusers recipe; ``--rank``, ``--lr``, ``--prior-preservation``) or
full DreamBooth (``--method full``, every UNet weight, :mod:`hyperbooth.methods.dreambooth_full`). At each checkpoint
it generates the identity's evaluation prompts of the world table (``--prompts`` per identity, the four prompt types,
:func:`hyperbooth.world.protocol.personalization_items`) with the rare-token prompt and CFG, and measures

- identity retrieval top-1 among 8 same-class identities (the headline; chance 0.125), the pairwise AUC, attribute
  recovery and the raw oracle cosine;
- prompt fidelity: the context oracle's "every attribute the prompt named is there", nan-mean

(``hyperbooth.world.fidelity.personalization_metrics``: the world table's code path);
- seconds: wall time of fine-tuning up to that step (setup and class images included, evaluation excluded).

The personalizer (``--hypernet``: a folder of any registered method, default the shipped e2e hypernetwork) gives its
point through the Personalizer interface: its time per subject (one ``personalize`` call after a warm-up, or the
method's own clock) and its fidelities on the same prompts and seeds. Step 0 (ΔW = 0) is the base model, the floor.
"time-to-equal-fidelity" is the fine-tune's time at which the mean curve first reaches the hypernetwork's retrieval
top-1 (linear interpolation between checkpoints), divided by the hypernetwork's time.

    python benchmarks/time_vs_fidelity.py [--identities 8] [--k 3] [--max-steps 800] [--json out.json] [--plot out.png]
    python benchmarks/time_vs_fidelity.py --split val --no-hypernet --lr 1e-3 --rank 8 --max-steps 1600   # tuning
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from hyperbooth.backbones.base import as_components
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.errors import ConfigError, HyperboothError
from hyperbooth.files import atomic_write, files_digest
from hyperbooth.generate import generate
from hyperbooth.methods import SHIPPED_E2E, load
from hyperbooth.methods.dreambooth_full import FullFinetuneConfig, full_finetune
from hyperbooth.methods.dreambooth_lora import FinetuneConfig, finetune
from hyperbooth.world.base_model import SHIPPED_BASE_MODEL
from hyperbooth.world.contexts import RARE_TOKEN
from hyperbooth.world.fidelity import personalization_metrics, reference_images
from hyperbooth.world.identity import make_identity
from hyperbooth.world.oracles import SHIPPED_ORACLES, Oracles
from hyperbooth.world.personalization import personalize_subjects
from hyperbooth.personalize import parse_options
from hyperbooth.world.protocol import personalization_items
from hyperbooth.world.splits import identity_seeds


def checkpoint_steps(max_steps: int, first: int = 25) -> list[int]:
    """``[0, first, 2·first, 4·first, …]`` below ``max_steps``, then ``max_steps``."""
    steps, s = [0], first
    while s < max_steps:
        steps.append(s)
        s *= 2
    if max_steps > 0:
        steps.append(max_steps)
    return steps


def time_to_reach(seconds: list[float], fidelity: list[float], target: float) -> float | None:
    """The first time at which the piecewise-linear curve through ``(seconds[i], fidelity[i])`` reaches ``target``.

    The first point at or above ``target`` ends the search: at point 0 its time; otherwise the time linearly
    interpolated between it and the point before. ``None`` if no point reaches ``target``. NaN points are skipped.
    """
    if len(seconds) != len(fidelity):
        raise ValueError(f"{len(seconds)} times but {len(fidelity)} fidelities")
    prev = None
    for s, f in zip(seconds, fidelity):
        if math.isnan(f) or math.isnan(s):
            continue
        if f >= target:
            if prev is None:
                return float(s)
            s0, f0 = prev
            return float(s0 + (target - f0) / (f - f0) * (s - s0))
        prev = (s, f)
    return None


def _json_safe(value):
    """NaN → None (JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


#: The figures of every checkpoint (``personalization_metrics``' names); ``retrieval`` is the headline.
FIGURES = ("retrieval", "auc", "attr_primary", "attr_secondary", "attr_pattern", "attr_shape", "subject", "prompt")


class Evaluator:
    """Generates one identity's evaluation prompts (``items_of[identity_seed]``, the world table's) with a LoRA (or
    none: the backbone as it is, e.g. inside a full fine-tune) and scores them with the oracles."""

    def __init__(self, base, oracles, items_of: dict, sample_steps: int, guidance_scale: float, seed: int):
        self.base, self.oracles, self.items_of = base, oracles, items_of
        self.sample_steps, self.guidance_scale, self.seed = sample_steps, guidance_scale, seed

    @torch.no_grad()
    def __call__(self, identity_seed: int, class_name: str, weights, index: int, guidance: str = "cfg") -> dict[str, float]:
        """``weights``: one subject's LoRA (``LoRAWeights`` or by component), or None for the backbone as it is."""
        items = self.items_of[identity_seed]
        prompts = [it.prompt(RARE_TOKEN) for it in items]
        n = len(prompts)
        if weights is not None:  # one row per prompt (the per-sample path, for every checkpoint alike)
            weights = {c: w.select([0] * n) for c, w in as_components(weights).items()}
        images = generate(self.base, prompts, weights=weights, guidance=guidance, guidance_scale=self.guidance_scale,
                          w_base=self.guidance_scale, steps=self.sample_steps, seed=self.seed + index).cpu()
        figures = personalization_metrics(self.oracles, images, items)
        return {name: figures[name] for name in FIGURES}


def run_dreambooth(evaluate: Evaluator, identity_seed: int, class_name: str, refs: torch.Tensor, index: int,
                   steps: list[int], cfg, method: str = "lora") -> list[dict]:
    """Fine-tune on ``refs`` (``method``: ``lora`` or ``full``); at each step of ``steps`` record seconds so far
    (evaluation excluded) and the figures."""
    rows = []
    clock = {"spent": 0.0, "since": time.perf_counter()}
    wanted = set(steps)

    def callback(step, weights=None):
        now = time.perf_counter()
        clock["spent"] += now - clock["since"]  # everything since the last callback was fine-tuning
        if step in wanted:
            rows.append({"step": step, "seconds": clock["spent"], **evaluate(identity_seed, class_name, weights, index)})
        clock["since"] = time.perf_counter()

    if method == "full":
        with full_finetune(evaluate.base, refs, class_name, cfg, callback=callback):
            pass
    else:
        finetune(evaluate.base, refs, class_name, cfg, callback=callback)
    return rows


@torch.no_grad()
def hypernet_point(personalizer, evaluate: Evaluator, identities, guidance: str) -> tuple[list[float], list[dict]]:
    """Milliseconds per subject of the personalizer (one ``personalize`` call per identity after an untimed warm-up,
    or the method's own clock: ``hyperbooth.world.personalization.personalize_subjects``) and its fidelities per
    identity."""
    ms, scores = [], []
    for index, (seed, class_name, refs) in enumerate(identities):
        weights, spent = personalize_subjects(personalizer, refs[None], [class_name], evaluate.base)  # (1, k, 3, H, W) → N = 1
        ms.append(spent)
        scores.append(evaluate(seed, class_name, weights, index, guidance=guidance))
    return ms, scores


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


def summarize(per_identity: list[list[dict]], steps: list[int]) -> list[dict]:
    """The mean curve over identities: per step, mean seconds and the nan-mean of every figure."""
    curve = []
    for step in steps:
        rows = [r for rows in per_identity for r in rows if r["step"] == step]
        curve.append({"step": step, "seconds": statistics.fmean(r["seconds"] for r in rows),
                      **{name: _nanmean(r[name] for r in rows) for name in FIGURES}})
    return curve


#: settings that change the DreamBooth-LoRA curve; a reused curve must have been made with the same ones
CURVE_SETTINGS = ("model", "oracles", "split", "method", "k", "prompts", "rank", "lr", "weight_decay", "prior_preservation", "num_class_images",
                  "sample_steps", "guidance_scale", "seed")
#: folder settings compared by their files (:func:`weights_digest`) when both runs recorded them, else by path
WEIGHT_FOLDERS = {"model": "model_weights", "oracles": "oracles_weights"}


def weights_digest(folder: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a model folder's weights and configs (``.safetensors`` and ``.json``
    files: relative names and bytes, in name order): the same model in another folder, or reached by another path,
    gives the same digest. A folder without ``.safetensors`` weights is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        raise ConfigError(f"{str(folder)!r} holds no .safetensors weights")
    return files_digest(files, root=folder)


def reused_curve(path: Path, args, weights: dict[str, str], identities: list[int], steps: list[int]) -> list[list[dict]]:
    """The per-identity DreamBooth-LoRA rows of an earlier run's JSON, after checking it was made with the same
    settings, identities and checkpoints (the machine and thread count are the user's to keep equal). ``weights``:
    this run's :data:`WEIGHT_FOLDERS` digests; the base model and the oracles are compared by them."""
    try:
        old = json.loads(Path(path).read_text())
        settings, rows = old["settings"], old["dreambooth_lora"]["per_identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--reuse-curve {str(path)!r} is not a time_vs_fidelity JSON ({type(e).__name__}: {e})") from None
    if any("retrieval" not in r for rows_ in rows for r in rows_):
        raise ConfigError(f"--reuse-curve {str(path)!r} was written before identity retrieval was measured; run the curve again")
    now = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    now.update(weights)
    for key in CURVE_SETTINGS:
        by_weights = WEIGHT_FOLDERS.get(key)
        if by_weights is not None and by_weights in settings:  # older JSONs lack the digests: compared by path
            key = by_weights
        if settings.get(key) != now.get(key):
            raise ConfigError(f"--reuse-curve {str(path)!r} was made with {key}={settings.get(key)!r}, this run has {key}={now.get(key)!r}")
    if old.get("identities") != identities or settings.get("checkpoints") != steps:
        raise ConfigError(f"--reuse-curve {str(path)!r} holds identities {old.get('identities')} at steps {settings.get('checkpoints')}, "
                          f"this run wants {identities} at {steps}")
    nan = float("nan")
    return [[{k: (nan if v is None else v) for k, v in r.items()} for r in rows_] for rows_ in rows]


# -- plot (PIL only) -------------------------------------------------------------------------------------------


def plot(path: Path, curve: list[dict], hyper: dict | None, floor: float, name: str = "DreamBooth-LoRA") -> None:
    """Seconds (log x) vs retrieval top-1: the fine-tune's curve, the hypernetwork's point, the base floor."""
    W, H, left, right, top, bottom = 720, 460, 70, 30, 40, 60
    im = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    points = [(c["seconds"], c["retrieval"], c["step"]) for c in curve if c["seconds"] > 0 and not math.isnan(c["retrieval"])]
    xs = [p[0] for p in points] + ([hyper["seconds"]] if hyper else [])
    ys = [p[1] for p in points] + ([hyper["retrieval"]] if hyper else []) + ([floor] if not math.isnan(floor) else [])
    if not xs or not ys:
        xs, ys = xs or [1.0], ys or [0.0]
    lo, hi = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    hi = max(hi, lo + 1)
    y_lo, y_hi = min(ys), max(ys)
    pad = max(0.05, 0.1 * (y_hi - y_lo))
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(s: float, f: float) -> tuple[float, float]:
        x = left + (math.log10(s) - lo) / (hi - lo) * (W - left - right)
        y = top + (y_hi - f) / (y_hi - y_lo) * (H - top - bottom)
        return x, y

    # axes, decade ticks, y ticks
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in range(lo, hi + 1):
        x, _ = px(10.0**e, y_lo)
        draw.line([x, top, x, H - bottom], fill=(225, 225, 225))
        label = f"{10.0**e:g}"
        draw.text((x - 3 * len(label), H - bottom + 6), label, fill="black", font=font)
    for i in range(6):
        f = y_lo + i * (y_hi - y_lo) / 5
        _, y = px(10.0**lo, f)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"{f:.2f}", fill="black", font=font)
    draw.text((W // 2 - 80, H - 25), "seconds per subject (log scale)", fill="black", font=font)
    draw.text((left, 12), f"identity retrieval top-1 of 8 vs time: {name} fine-tuning vs one hypernetwork pass", fill="black", font=font)

    if not math.isnan(floor):  # base model (step 0) as a dashed line
        _, y = px(10.0**lo, floor)
        for x in range(left, W - right, 12):
            draw.line([x, y, min(x + 6, W - right), y], fill=(120, 120, 120))
        draw.text((left + 6, y + 3), "base model (no personalization)", fill=(90, 90, 90), font=font)
    coords = [px(s, f) for s, f, _ in points]
    if len(coords) > 1:
        draw.line(coords, fill=(30, 90, 200), width=2)
    for (x, y), (_, _, step) in zip(coords, points):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
        draw.text((x + 4, y - 14), str(step), fill=(30, 90, 200), font=font)
    if coords:
        draw.text((coords[-1][0] - 110, coords[-1][1] + 6), f"{name} (steps)", fill=(30, 90, 200), font=font)
    if hyper:
        x, y = px(hyper["seconds"], hyper["retrieval"])
        draw.polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], fill=(210, 40, 40))
        draw.text((x + 8, y - 6), "hypernetwork", fill=(210, 40, 40), font=font)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


# -- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped world model)")
    parser.add_argument("--oracles", type=Path, default=None, help="oracle folder (default: the shipped oracles)")
    parser.add_argument("--hypernet", type=Path, default=None, help="hypernetwork folder (default: the shipped e2e one)")
    parser.add_argument("--with", dest="options", default="", metavar="KEY=VALUE,...",
                        help="the personalizer's inference options (e.g. fast_finetune_steps=40 for hyperdreambooth)")
    parser.add_argument("--no-hypernet", action="store_true", help="only the fine-tune's curve")
    parser.add_argument("--reuse-curve", type=Path, default=None,
                        help="take the fine-tune's curve from this earlier --json output (same settings) instead of fine-tuning again")
    parser.add_argument("--identities", type=int, default=8, help="identities of --split")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="held-out identities (test) or the tuning ones (val)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora", help="DreamBooth-LoRA or full DreamBooth (every UNet weight)")
    parser.add_argument("--k", type=int, default=3, help="reference images per identity")
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=None, help="steps to evaluate (default 0, 25, 50, 100, …, max)")
    parser.add_argument("--prompts", type=int, default=6, help="evaluation prompts per identity (the world table's, all four prompt types)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 (lora), 5e-6 (full), the diffusers recipes'")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--prior-preservation", action="store_true")
    parser.add_argument("--num-class-images", type=int, default=100)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--hypernet-guidance", choices=("cfg", "hm-cfg"), default="cfg", help="CFG keeps the sampling identical to DreamBooth-LoRA's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here ('-' for stdout)")
    parser.add_argument("--plot", type=Path, default=None, help="write the curve as a PNG here")
    args = parser.parse_args(argv)

    if args.identities < 1 or args.k < 1 or args.max_steps < 0 or args.prompts < 1:
        raise ConfigError("--identities, --k and --prompts must be at least 1 and --max-steps at least 0")
    if args.lr is None:
        args.lr = 5e-6 if args.method == "full" else 1e-4
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = sorted(set(args.checkpoints)) if args.checkpoints else checkpoint_steps(args.max_steps)
    if steps[0] < 0:
        raise ConfigError(f"--checkpoints must be >= 0, got {steps[0]}")
    max_steps = max(steps)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(f"machine: {machine['platform']}, {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']} "
          f"with {machine['torch_threads']} threads")
    print(f"command: {command}")

    base = WorldBackbone.from_pretrained(args.model)
    oracles = Oracles.load(args.oracles)
    seeds = list(identity_seeds(args.split, args.identities))
    items_of: dict[int, list] = {}
    for item in personalization_items(seeds, args.prompts):
        items_of.setdefault(item.identity_seed, []).append(item)
    evaluate = Evaluator(base, oracles, items_of, args.sample_steps, args.guidance_scale, args.seed)
    identities = [(seed, make_identity(seed).class_name, reference_images(seed, args.k, seed=args.seed, resolution=base.resolution)) for seed in seeds]

    config_class = FullFinetuneConfig if args.method == "full" else FinetuneConfig
    cfg = config_class(steps=max(max_steps, 1), rank=args.rank, lr=args.lr, weight_decay=args.weight_decay,
                       prior_preservation=args.prior_preservation, num_class_images=args.num_class_images, seed=args.seed)
    weights = {"model_weights": weights_digest(args.model or SHIPPED_BASE_MODEL), "oracles_weights": weights_digest(args.oracles or SHIPPED_ORACLES)}
    per_identity = []
    if args.reuse_curve is not None:
        per_identity = reused_curve(args.reuse_curve, args, weights, [seed for seed, _, _ in identities], steps)
        print(f"fine-tuning curve of {len(per_identity)} identities taken from {args.reuse_curve}")
    for index, (seed, class_name, refs) in enumerate(identities):
        if args.reuse_curve is not None:
            break
        t0 = time.perf_counter()
        rows = run_dreambooth(evaluate, seed, class_name, refs, index, steps, cfg, args.method)
        per_identity.append(rows)
        print(f"identity {seed} ({class_name}): retrieval {rows[-1]['retrieval']:.3f} at step {rows[-1]['step']} "
              f"after {rows[-1]['seconds']:.1f} s of fine-tuning ({time.perf_counter() - t0:.0f} s with evaluation)", flush=True)
    curve = summarize(per_identity, steps)
    floor = curve[0]["retrieval"] if curve[0]["step"] == 0 else float("nan")

    hyper = None
    if not args.no_hypernet:
        folder = args.hypernet or SHIPPED_E2E
        personalizer = load(folder).with_options(**parse_options(args.options)).eval()  # any registered method
        personalizer.check_backbone(base, folder)
        ms, scores = hypernet_point(personalizer, evaluate, identities, args.hypernet_guidance)
        hyper = {"ms_per_subject": statistics.fmean(ms), "seconds": statistics.fmean(ms) / 1e3,
                 **{name: _nanmean(s[name] for s in scores) for name in FIGURES},
                 "guidance": args.hypernet_guidance, "per_identity": scores}

    name = "full DreamBooth" if args.method == "full" else f"DreamBooth-LoRA (rank {args.rank})"
    print()
    print(f"{name}, lr {args.lr:g}, {'prior preservation' if args.prior_preservation else 'no prior'}, {len(identities)} {args.split} "
          f"identities, k={args.k}, {args.prompts} prompts each, CFG {args.guidance_scale:g}, {args.sample_steps} sampling steps")
    print(f"{'steps':>8} {'seconds':>9} {'retrieval':>9} {'AUC':>6} {'primary':>7} {'second.':>7} {'pattern':>7} {'shape':>6} {'cosine':>7} {'prompt':>7}")

    def line(label, seconds, c):
        return (f"{label:>8} {seconds:>9.4g} {c['retrieval']:>9.3f} {c['auc']:>6.3f} {c['attr_primary']:>7.3f} {c['attr_secondary']:>7.3f} "
                f"{c['attr_pattern']:>7.3f} {c['attr_shape']:>6.3f} {c['subject']:>7.3f} {c['prompt']:>7.3f}")

    for c in curve:
        print(line(c["step"], c["seconds"], c))
    ratio = reached = None
    if hyper is not None:
        print(line("hypernet", hyper["seconds"], hyper) + f"   ({hyper['ms_per_subject']:.1f} ms per subject, {hyper['guidance']})")
        reached = time_to_reach([c["seconds"] for c in curve], [c["retrieval"] for c in curve], hyper["retrieval"])
        if reached is None:
            print(f"time-to-equal-fidelity: not reached within {curve[-1]['seconds']:.1f} s ({max_steps} steps); "
                  f"ratio > {curve[-1]['seconds'] / hyper['seconds']:.0f}x")
        else:
            ratio = reached / hyper["seconds"]
            print(f"time-to-equal-fidelity: {name} reaches the hypernetwork's retrieval top-1 after {reached:.2f} s, "
                  f"{ratio:.0f}x the hypernetwork's {hyper['ms_per_subject']:.1f} ms")

    result = {
        "machine": machine, "command": command,
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **weights, "checkpoints": steps},
        "identities": [seed for seed, _, _ in identities],
        "dreambooth_lora": {"curve": curve, "per_identity": per_identity},  # the fine-tune's curve (either --method)
        "base_floor_retrieval": floor,
        "hypernet": hyper,
        "time_to_equal_fidelity_s": reached,
        "time_to_equal_fidelity_ratio": ratio,
        "reached": reached is not None,
    }
    if args.json is not None:
        text = json.dumps(_json_safe(result), indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
            print(f"wrote {args.json}")
    if args.plot is not None:
        plot(args.plot, curve, hyper, floor, "full DreamBooth" if args.method == "full" else "DreamBooth-LoRA")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HyperboothError as e:
        print(f"time_vs_fidelity: error: {e}", file=sys.stderr)
        sys.exit(2)
