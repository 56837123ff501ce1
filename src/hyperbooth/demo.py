"""`hyperbooth demo`: the main job of the quick start.

Until the shipped world models exist (base model, hypernetwork), the demo runs the smallest real end-to-end path
there is: an SD-1.5-architecture pipeline (tiny, random weights, built from configs and loaded back with
``StableDiffusionPipeline.from_pretrained``), per-sample LoRAs for four subjects applied in one batched UNet call,
the LoRA files exported in both layouts and loaded by diffusers' own ``load_lora_weights``, and the agreement of
every path measured. It then says what is still missing.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from hyperbooth.errors import ConfigError

log = logging.getLogger(__name__)

MISSING = (
    "the shipped DreamBench-World base model and oracles (issue: the embedded world)",
    "the shipped e2e hypernetwork and `hyperbooth personalize` (issue: training engine and e2e method)",
    "generation with CFG / HM-CFG and the captioned demo grid (issue: generation)",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the demo (today: the LoRA runtime end to end on a tiny SD 1.5 pipeline)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for the files it writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusers import StableDiffusionPipeline

    from hyperbooth.lora import DEFAULT_UNET_TARGETS, LoRAWeights, apply_lora, load_lora, save_lora, target_shapes
    from hyperbooth.tiny import tiny_sd_pipeline

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_sd_pipeline(Path(tmp) / "tiny-sd15", seed=args.seed)
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    unet = pipe.unet.requires_grad_(False)
    shapes = target_shapes(unet, DEFAULT_UNET_TARGETS)
    rows.append(("pipeline", f"SD 1.5 classes, tiny config, {sum(p.numel() for p in unet.parameters()):,} UNet params, loaded with from_pretrained"))

    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    subjects = LoRAWeights.random(shapes, rank=4, num_subjects=4, std=0.1, generator=g)  # stands in for a hypernetwork
    rows.append(("LoRA", f"{len(shapes)} target modules x 4 subjects, rank 4 ({1e3 * (time.perf_counter() - t0):.1f} ms)"))

    x_t = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.full((4,), 500)
    cond = torch.randn(4, 6, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        base = unet(x_t, t, encoder_hidden_states=cond).sample
        with apply_lora(unet, subjects, mode="per_sample"):
            batched = unet(x_t, t, encoder_hidden_states=cond).sample
        separate = []
        for i in range(4):
            with apply_lora(unet, subjects.select(i), mode="merged"):
                separate.append(unet(x_t[i : i + 1], t[i : i + 1], encoder_hidden_states=cond[i : i + 1]).sample)
    rows.append(("per-sample vs base", f"max |Δε| = {(batched - base).abs().max():.3e} (the LoRAs act)"))
    rows.append(("per-sample vs merged, one by one", f"max |Δε| = {(batched - torch.cat(separate)).abs().max():.3e}"))

    one = subjects.select(0)
    with torch.no_grad(), apply_lora(unet, one, mode="shared"):
        ours = unet(x_t[:1], t[:1], encoder_hidden_states=cond[:1]).sample
    for fmt in ("diffusers", "kohya"):
        path = save_lora(out / f"subject0_{fmt}.safetensors", one, fmt, models={"unet": unet}, method="random", base_model="tiny-sd15")
        load_lora(path, unet)  # our importer checks it against the model
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            theirs = pipe.unet(x_t[:1], t[:1], encoder_hidden_states=cond[:1]).sample
        pipe.unload_lora_weights()
        rows.append((f"{fmt} file via diffusers load_lora_weights", f"max |Δε| vs hyperbooth = {(theirs - ours).abs().max():.3e}  ({path})"))

    width = max(len(k) for k, _ in rows)
    print("hyperbooth demo: the LoRA runtime end to end")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("Not yet in this build (the demo grows as they land):")
    for item in MISSING:
        print(f"  - {item}")
    return 0
