"""Sampling-step and personalization latency, as ratios against baselines measured in the same run.

1. One denoising step for N subjects: CFG of the personalized model (``[P(∅); P(c)]``, one call of 2N rows),
   HM-CFG in one call (``[B(∅); B(c); P(c)]``, 3N rows, base rows carry no LoRA), and HM-CFG as three separate
   calls (what a pipeline without per-sample LoRA does). Ratio: each against CFG's step, paired per round.
2. Personalization: images → ``LoRAWeights`` (the whole hypernetwork pass) and images → a ``.safetensors`` file,
   against the image encoder's forward alone, paired per round.

Runs on the shipped world models when they are there (``--random`` forces random weights of the same shapes).
Goals (issue "Generation"): HM-CFG in one call ≤ 1.35× CFG's step; personalization ≤ 2× the encoder's forward.

    python benchmarks/sampling.py [--subjects 1 4] [--rounds 15] [--random]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hyperbooth.guidance import cfg, hm_cfg
from hyperbooth.lora import LoRAInjector, save_lora, target_shapes


def load_models(random: bool):
    """(base model, hypernetwork): the shipped ones, or random weights of the same architecture."""
    from hyperbooth.generate import load_hypernet
    from hyperbooth.world.base_model import WorldBaseModel

    base = WorldBaseModel.from_pretrained()
    hypernet = load_hypernet()
    if random:
        torch.manual_seed(0)
        for p in list(base.unet.parameters()) + list(hypernet.parameters()):
            p.data.normal_(0, 0.02)
    return base, hypernet.eval()


def paired(fns: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Call every fn once per round (round 0 warms up); → name: (median ms, median ratio to the first fn)."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    first = next(iter(times.values()))
    return {name: (statistics.median(ts) * 1e3, statistics.median(a / b for a, b in zip(ts, first))) for name, ts in times.items()}


@torch.inference_mode()
def bench_step(base, hypernet, n: int, rounds: int) -> dict:
    unet = base.unet
    g = torch.Generator().manual_seed(n)
    res = base.resolution
    x_t = torch.randn(n, 3, res, res, generator=g)
    t = torch.full((n,), 500)
    weights = hypernet(torch.rand(n, 1, 3, res, res, generator=g) * 2 - 1)
    prompts = [f"a sks toy in the snow {i}" for i in range(n)]
    s2, m2 = base.encode([""] * n + prompts)  # CFG: [∅; c]
    s3, m3 = base.encode([""] * n + prompts + prompts)  # HM-CFG: [∅; c; c]
    injector = LoRAInjector(unet)
    rows3 = torch.cat([torch.full((2 * n,), -1), torch.arange(n)])

    def cfg_step():
        with injector.apply(weights, mode="per_sample", rows=torch.cat([torch.arange(n), torch.arange(n)])):
            out = unet(x_t.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=s2, encoder_attention_mask=m2).sample
        return cfg(*out.chunk(2), 3.0)

    def hm_one_call():
        with injector.apply(weights, mode="per_sample", rows=rows3):
            out = unet(x_t.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=s3, encoder_attention_mask=m3).sample
        return hm_cfg(*out.chunk(3), 3.0, 1.0)

    def hm_three_calls():
        uncond = unet(x_t, t, encoder_hidden_states=s3[:n], encoder_attention_mask=m3[:n]).sample
        cond = unet(x_t, t, encoder_hidden_states=s3[n : 2 * n], encoder_attention_mask=m3[n : 2 * n]).sample
        with injector.apply(weights, mode="per_sample"):
            pers = unet(x_t, t, encoder_hidden_states=s3[2 * n :], encoder_attention_mask=m3[2 * n :]).sample
        return hm_cfg(uncond, cond, pers, 3.0, 1.0)

    torch.testing.assert_close(hm_one_call(), hm_three_calls(), rtol=1e-4, atol=1e-4)  # the same numbers either way
    return paired({"CFG (personalized, 2N rows)": cfg_step, "HM-CFG, one call (3N rows)": hm_one_call, "HM-CFG, three calls": hm_three_calls}, rounds)


@torch.inference_mode()
def bench_personalize(base, hypernet, k: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(k)
    refs = torch.rand(1, k, 3, base.resolution, base.resolution, generator=g) * 2 - 1
    tmp = Path(tempfile.mkdtemp())

    def encoder_only():
        return hypernet.encoder(refs.flatten(0, 1))

    def to_weights():
        return hypernet(refs)

    def to_file():
        save_lora(tmp / "subject.safetensors", hypernet(refs), "diffusers", models={"unet": base.unet}, method="e2e")

    return paired({"image encoder forward": encoder_only, "images → LoRAWeights": to_weights, "images → .safetensors file": to_file}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 4], help="N subjects sampled together")
    parser.add_argument("--refs", type=int, nargs="+", default=[1, 3], help="reference images per subject")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--random", action="store_true", help="random weights instead of the shipped models")
    args = parser.parse_args()

    base, hypernet = load_models(args.random)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"world UNet {sum(p.numel() for p in base.unet.parameters()) / 1e6:.1f}M params at {base.resolution}x{base.resolution}, "
          f"LoRA on {len(target_shapes(base.unet, hypernet.config.targets))} modules, rank {hypernet.config.rank}")
    print("\n| N subjects | one denoising step | ms (median) | ratio to CFG (median of paired rounds) |\n|---|---|---|---|")
    for n in args.subjects:
        for name, (ms, ratio) in bench_step(base, hypernet, n, args.rounds).items():
            print(f"| {n} | {name} | {ms:.1f} | {ratio:.3f}x |")
    print("\n| references | personalization | ms (median) | ratio to the encoder (median of paired rounds) |\n|---|---|---|---|")
    for k in args.refs:
        for name, (ms, ratio) in bench_personalize(base, hypernet, k, args.rounds).items():
            print(f"| {k} | {name} | {ms:.1f} | {ratio:.3f}x |")
    print("goals: HM-CFG in one call <= 1.35x CFG's step; personalization <= 2x the encoder's forward")


if __name__ == "__main__":
    main()
