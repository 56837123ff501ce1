"""Sampling-step and personalization latency, as ratios against baselines measured in the same run.

1. One denoising step for N subjects: CFG as ``generate`` runs it (one subject: the LoRA merged into the weights;
   several: per-sample rows ``[P(∅); P(c)]``, one call of 2N rows), HM-CFG in one call (``[B(∅); B(c); P(c)]``, 3N
   rows, base rows carry no LoRA), and HM-CFG as three separate calls (what a pipeline without per-sample LoRA
   does). Each LoRA is applied once before the timed steps, as ``generate`` applies it once per image; applying it
   is timed as a row of its own. The UNet alone at 3N and 2N rows (no LoRA) gives what a third row costs on the
   machine, the floor under HM-CFG's ratio. Ratios: against the first row, paired per round.
2. Whole images (``generate``): CFG, HM-CFG at every step, and HM-CFG with a timestep interval (the personalized
   branch on the noisier steps only; the others run the base rows alone).
3. Personalization: images → ``LoRAWeights`` (the whole hypernetwork pass) and images → a ``.safetensors`` file,
   against the image encoder's forward alone, paired per round.

Runs on the shipped world models when they are there (``--random`` forces random weights of the same shapes).
``--sd15`` adds the personalization latency at Stable Diffusion 1.5 scale: a CLIP ViT-L/14 vision encoder (the
transformers architecture from its config, random weights, loaded with ``from_pretrained`` from a temp folder) and
the same e2e decoder emitting LoRA for the SD 1.5 UNet's targets (shapes read from the UNet built on the meta device).
Goals (issue "Generation"): HM-CFG in one call ≤ 1.35× CFG's step; personalization ≤ 2× the encoder's forward.

    python benchmarks/sampling.py [--subjects 1 4] [--rounds 15] [--threads T] [--random] [--interval 0.5 1] [--sd15]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel

from hyperbooth.backbones import load_backbone
from hyperbooth.generate import generate
from hyperbooth.guidance import cfg, hm_cfg
from hyperbooth.lora import LoRAInjector, save_lora, target_shapes
from hyperbooth.methods.e2e import E2EHyperNetwork
from hyperbooth.personalize import load_personalizer
from hyperbooth.tiny import SD15_UNET_CONFIG


def load_models(random: bool):
    """(base model, hypernetwork): the shipped ones, or random weights of the same architecture."""
    base = load_backbone(None)
    hypernet = load_personalizer()
    if random:
        torch.manual_seed(0)
        for p in list(base.unet.parameters()) + list(hypernet.parameters()):
            p.data.normal_(0, 0.02)
    return base, hypernet.eval()


def paired_times(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Call every fn once per round (round 0 warms up); → name: seconds of each later round."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``name``'s time over ``baseline``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def paired(fns: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """name: (median ms, median ratio to the first fn), over paired rounds."""
    times = paired_times(fns, rounds)
    first = next(iter(times))
    return {name: (statistics.median(ts) * 1e3, ratio(times, name, first)) for name, ts in times.items()}


@torch.inference_mode()
def bench_step(base, hypernet, n: int, rounds: int) -> dict:
    """One denoising step of N subjects, each variant on its own copy of the UNet with its LoRA applied once before
    the timed steps, as ``generate`` applies it once per image (applying it is a row of its own). The baseline is
    CFG as ``generate`` runs it: the LoRA merged into the weights for one subject, per-sample rows for several.
    ``UNet alone`` rows are the same calls with no LoRA at all: what 3N rows cost against 2N on this machine."""
    unet = base.unet
    g = torch.Generator().manual_seed(n)
    res = base.resolution
    x_t = torch.randn(n, 3, res, res, generator=g)
    t = torch.full((n,), 500)
    weights = hypernet(torch.rand(n, 1, 3, res, res, generator=g) * 2 - 1)
    prompts = [f"a sks toy in the snow {i}" for i in range(n)]
    c2 = base.encode_prompts([""] * n + prompts)  # CFG: [∅; c]
    c3 = base.encode_prompts([""] * n + prompts + prompts)  # HM-CFG: [∅; c; c]
    s2, m2, s3, m3 = c2.states, c2.mask, c3.states, c3.mask
    rows3 = torch.cat([torch.full((2 * n,), -1), torch.arange(n)])

    def call2(model):
        return model(x_t.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=s2, encoder_attention_mask=m2).sample

    def call3(model):
        return model(x_t.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=s3, encoder_attention_mask=m3).sample

    with contextlib.ExitStack() as stack:

        def with_lora(**kw):  # a copy of the UNet holding the LoRA for the whole benchmark
            model = copy.deepcopy(unet)
            stack.enter_context(LoRAInjector(model).apply(weights, **kw))
            return model

        # CFG's rows as generate lays them out ([P(∅) x N; P(c) x N], rows=None: row i uses subject i mod N)
        per_sample, hm = with_lora(mode="per_sample"), with_lora(mode="per_sample", rows=rows3)
        fns = {}
        if n == 1:
            merged = with_lora(mode="merged")
            fns["CFG, LoRA merged (generate's path for one subject)"] = lambda: cfg(*call2(merged).chunk(2), 3.0)
        fns["CFG, per-sample LoRA (2N rows)"] = lambda: cfg(*call2(per_sample).chunk(2), 3.0)
        fns["HM-CFG, one call (3N rows)"] = lambda: hm_cfg(*call3(hm).chunk(3), 3.0, 1.0)

        def hm_three_calls():
            uncond = unet(x_t, t, encoder_hidden_states=s3[:n], encoder_attention_mask=m3[:n]).sample
            cond = unet(x_t, t, encoder_hidden_states=s3[n : 2 * n], encoder_attention_mask=m3[n : 2 * n]).sample
            p = per_sample(x_t, t, encoder_hidden_states=s3[2 * n :], encoder_attention_mask=m3[2 * n :]).sample
            return hm_cfg(uncond, cond, p, 3.0, 1.0)

        def apply_hooks():  # what generate pays once per image before its steps
            with LoRAInjector(unet).apply(weights, mode="per_sample", rows=rows3):
                pass

        fns["HM-CFG, three calls"] = hm_three_calls
        fns["UNet alone, 2N rows (no LoRA)"] = lambda: call2(unet)
        fns["UNet alone, 3N rows (no LoRA)"] = lambda: call3(unet)
        fns["applying the per-sample LoRA (once per image)"] = apply_hooks
        torch.testing.assert_close(fns["HM-CFG, one call (3N rows)"](), hm_three_calls(), rtol=1e-4, atol=1e-4)  # same numbers
        for lora_rows, bare_rows in ((call3(hm)[2 * n :], call3(unet)[2 * n :]), (call2(per_sample), call2(unet))):
            if torch.allclose(lora_rows, bare_rows):  # a LoRA that is not applied would make every variant look free
                raise RuntimeError("the LoRA does not change the UNet's output: the benchmark would time the bare UNet")
        if n == 1:
            torch.testing.assert_close(fns["CFG, LoRA merged (generate's path for one subject)"](), fns["CFG, per-sample LoRA (2N rows)"](), rtol=1e-3, atol=1e-4)
        times = paired_times(fns, rounds)
    baseline = next(iter(fns))
    rows = {name: (statistics.median(ts) * 1e3, ratio(times, name, baseline)) for name, ts in times.items()}
    floor = "UNet alone, 3N rows vs 2N rows (no LoRA: the machine's cost of a third row)"
    rows[floor] = (statistics.median(times["UNet alone, 3N rows (no LoRA)"]) * 1e3,
                   ratio(times, "UNet alone, 3N rows (no LoRA)", "UNet alone, 2N rows (no LoRA)"))
    return rows


@torch.inference_mode()
def bench_image(base, hypernet, steps: int, rounds: int, interval: tuple[float, float]) -> dict:
    """Whole images (``generate``, ``steps`` steps, one subject): CFG, HM-CFG every step, HM-CFG whose personalized
    branch runs only for noise levels in ``interval`` (its other steps run the 2 base rows)."""
    g = torch.Generator().manual_seed(0)
    weights = hypernet(torch.rand(1, 1, 3, base.resolution, base.resolution, generator=g) * 2 - 1)
    prompts = ["a sks toy in the snow"]
    kw = dict(steps=steps, seed=0)
    lo, hi = interval
    return paired({
        "CFG (merged LoRA)": lambda: generate(base, prompts, weights, guidance="cfg", **kw),
        "HM-CFG, every step": lambda: generate(base, prompts, weights, guidance="hm-cfg", **kw),
        f"HM-CFG, personalized branch for t/T in [{lo:g}, {hi:g}]": lambda: generate(base, prompts, weights, guidance="hm-cfg", pers_interval=interval, **kw),
    }, rounds)


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
        save_lora(tmp / "subject.safetensors", hypernet(refs), "diffusers", models={"unet": base.unet}, method=hypernet.method)

    return paired({"image encoder forward": encoder_only, "images → LoRAWeights": to_weights, "images → .safetensors file": to_file}, rounds)


#: CLIP ViT-L/14 vision tower (openai/clip-vit-large-patch14, vision_config).
CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)


def sd15_hypernet(like: torch.nn.Module, folder: Path):
    """The e2e hypernetwork with the shipped decoder's settings, a CLIP ViT-L/14 encoder, targets of SD 1.5's UNet."""
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L14)).save_pretrained(folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    shapes = target_shapes(unet, like.config.targets)
    return E2EHyperNetwork(replace(like.config, encoder=str(folder)), shapes).eval(), unet


@torch.inference_mode()
def bench_personalize_sd15(hypernet, k: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(k)
    refs = torch.rand(1, k, 3, 512, 512, generator=g) * 2 - 1  # reference photos, resized by the encoder
    return paired({"image encoder forward": lambda: hypernet.encoder(refs.flatten(0, 1)), "images → LoRAWeights": lambda: hypernet(refs)}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 4], help="N subjects sampled together")
    parser.add_argument("--refs", type=int, nargs="+", default=[1, 3], help="reference images per subject")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, from OMP_NUM_THREADS)")
    parser.add_argument("--random", action="store_true", help="random weights instead of the shipped models")
    parser.add_argument("--image-steps", type=int, default=15, help="sampling steps of the whole-image rows")
    parser.add_argument("--interval", type=float, nargs=2, default=(0.5, 1.0), metavar=("LO", "HI"), help="HM-CFG timestep interval of the whole-image row")
    parser.add_argument("--sd15", action="store_true", help="also personalization latency at SD 1.5 scale (CLIP ViT-L/14 encoder)")
    parser.add_argument("--sd15-rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    base, hypernet = load_models(args.random)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"world UNet {sum(p.numel() for p in base.unet.parameters()) / 1e6:.1f}M params at {base.resolution}x{base.resolution}, "
          f"LoRA on {len(target_shapes(base.unet, hypernet.config.targets))} modules, rank {hypernet.config.rank}")
    print("\n| N subjects | one denoising step | ms (median) | ratio to the first row, CFG as generate runs it (median of paired rounds) |\n|---|---|---|---|")
    for n in args.subjects:
        for name, (ms, ratio) in bench_step(base, hypernet, n, args.rounds).items():
            print(f"| {n} | {name} | {ms:.1f} | {ratio:.3f}x |")
    print(f"\n| one image, {args.image_steps} steps | ms (median) | ratio to CFG (median of paired rounds) |\n|---|---|---|")
    for name, (ms, ratio) in bench_image(base, hypernet, args.image_steps, max(3, args.rounds // 3), tuple(args.interval)).items():
        print(f"| {name} | {ms:.1f} | {ratio:.3f}x |")
    print("\n| references | personalization | ms (median) | ratio to the encoder (median of paired rounds) |\n|---|---|---|---|")
    for k in args.refs:
        for name, (ms, ratio) in bench_personalize(base, hypernet, k, args.rounds).items():
            print(f"| {k} | {name} | {ms:.1f} | {ratio:.3f}x |")
    if args.sd15:
        with tempfile.TemporaryDirectory() as folder:
            big, unet = sd15_hypernet(hypernet, Path(folder))
            decoder_params = sum(p.numel() for n, p in big.named_parameters() if not n.startswith("encoder.")) / 1e6
            print(f"\nSD 1.5 scale: CLIP ViT-L/14 encoder ({sum(p.numel() for p in big.encoder.parameters()) / 1e6:.0f}M params, 224x224), "
                  f"decoder {decoder_params:.1f}M params emitting rank {big.config.rank} for {len(big.names)} SD 1.5 UNet modules")
            print("\n| references | personalization (SD 1.5 scale) | ms (median) | ratio to the encoder (median of paired rounds) |\n|---|---|---|---|")
            for k in args.refs:
                for name, (ms, ratio) in bench_personalize_sd15(big, k, args.sd15_rounds).items():
                    print(f"| {k} | {name} | {ms:.1f} | {ratio:.3f}x |")
    print("goals: HM-CFG in one call <= 1.35x CFG's step; personalization <= 2x the encoder's forward")


if __name__ == "__main__":
    main()
