"""UNet forward time with no LoRA, merged, and per-sample LoRA (N = 1, 4, 8), as ratios to no LoRA in the same run.

Two UNets of diffusers' UNet2DConditionModel, random weights:
- SD 1.5's architecture at full channel widths (860M parameters), at a small latent size so it runs on a CPU;
- the embedded world's base-model size.

The LoRA targets SD's attention projections (to_q, to_k, to_v, to_out.0 in self and cross attention), rank 4.
Three copies of the UNet (plain, merged, per-sample) run back to back in each round and the ratio is taken within
the round, then the median over rounds is reported: on a machine whose speed drifts, neighbouring calls are slowed
alike. "apply + restore" is the one-off cost of entering and leaving the LoRA context (hooks; or merge and the
bit-exact unmerge, which copies the target weights), paid once per subject when sampling.

    python benchmarks/lora_overhead.py [--sd-latent 8] [--rounds 5] [--batches 1 4 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from hyperbooth.lora import DEFAULT_UNET_TARGETS, LoRAWeights, apply_lora, target_shapes
from hyperbooth.tiny import SD15_UNET_CONFIG
from hyperbooth.world.base_model import WORLD_UNET_CONFIG


def bench_unet(name: str, config: dict, latent: int, text_len: int, batches: list[int], rank: int, rounds: int) -> list[tuple]:
    """Rows of (unet, params, size, N, mode, median forward ms, median paired ratio, apply+restore ms).

    Three copies of one UNet: plain, merged (context entered once), per-sample (context entered once). Each round
    calls the three back to back, and the ratio is taken within the round: a machine whose speed drifts (shared
    cores) slows neighbouring calls alike, so the paired ratio is far steadier than a ratio of separate medians.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    shapes = target_shapes(unet, DEFAULT_UNET_TARGETS)
    params = sum(p.numel() for p in unet.parameters())
    rows = []
    for n in batches:
        g = torch.Generator().manual_seed(n)
        x_t = torch.randn(n, config["in_channels"], latent, latent, generator=g)
        t = torch.full((n,), 500)
        cond = torch.randn(n, text_len, config["cross_attention_dim"], generator=g)
        per_sample = LoRAWeights.random(shapes, rank=rank, num_subjects=n, std=0.01, generator=g)
        models = {"none": unet, "merged": copy.deepcopy(unet), "per-sample": copy.deepcopy(unet)}
        setup_ms = {"none": 0.0}
        with contextlib.ExitStack() as stack, torch.inference_mode():
            for mode, weights, lora_mode in (("merged", per_sample.select(0), "merged"), ("per-sample", per_sample, "per_sample")):
                t0 = time.perf_counter()
                with apply_lora(models[mode], weights, mode=lora_mode):
                    pass
                setup_ms[mode] = (time.perf_counter() - t0) * 1e3  # one apply + restore
                stack.enter_context(apply_lora(models[mode], weights, mode=lora_mode))
            times = {mode: [] for mode in models}
            for r in range(rounds + 1):
                for mode, model in models.items():
                    t0 = time.perf_counter()
                    model(x_t, t, encoder_hidden_states=cond)
                    if r > 0:  # round 0 warms up
                        times[mode].append(time.perf_counter() - t0)
        for mode, samples in times.items():
            ratios = [a / b for a, b in zip(samples, times["none"])]
            rows.append((name, f"{params / 1e6:.1f}M", f"{latent}x{latent}", n, mode, statistics.median(samples) * 1e3, statistics.median(ratios), setup_ms[mode]))
        del models
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-latent", type=int, default=8, help="latent size for the SD 1.5-shaped UNet")
    parser.add_argument("--world-size", type=int, default=32, help="image size for the world UNet (pixel space)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-sd", action="store_true")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    if not args.skip_sd:
        rows += bench_unet("SD 1.5 UNet", SD15_UNET_CONFIG, args.sd_latent, 77, args.batches, args.rank, args.rounds)
    rows += bench_unet("world UNet", WORLD_UNET_CONFIG, args.world_size, 16, args.batches, args.rank, args.rounds)
    print(f"| UNet | params | spatial | N (batch) | LoRA (rank {args.rank}) | forward ms (median) | ratio to none (median of paired rounds) | apply + restore ms (once per subject) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, params, size, n, mode, ms, ratio, apply_ms in rows:
        print(f"| {name} | {params} | {size} | {n} | {mode} | {ms:.1f} | {ratio:.3f}x | {apply_ms:.1f} |")
    print("goals: merged <= 1.02x, per-sample rank 4 <= 1.15x")


if __name__ == "__main__":
    main()
