"""LoRA overhead, HM-CFG's step and personalization latency on the SDXL and SD3 backbones, as paired ratios.

The SD 1.5 figures (``benchmarks/lora_overhead.py``, ``benchmarks/sampling.py``) at the scale of the two new
backbones, random weights built from their configs (nothing is downloaded):

- SDXL: diffusers' ``UNet2DConditionModel`` with ``SDXL_UNET_CONFIG`` (2.6B parameters, full widths), 77 text tokens
  of 2048 (the two text encoders' states), the pooled text embedding (1280) and the six size/crop time ids; LoRA on
  hyperbooth's ``DEFAULT_UNET_TARGETS`` (the 70 transformer blocks' attention projections, 560 modules).
- SD3: diffusers' ``SD3Transformer2DModel`` with the published config of stabilityai/stable-diffusion-3-medium's
  transformer (2.0B parameters: 24 joint blocks of 24 heads x 64, patch 2, joint_attention_dim 4096, pooled 2048),
  77 text tokens of 4096, pooled 2048; LoRA on the backbone's ``DEFAULT_SD3_TARGETS`` (attention projections of both
  streams and the image stream's MLP, 239 modules).

At a small latent so that a CPU runs them (SDXL 8x8: its attention levels at 4x4 and 2x2; the smallest latent whose
levels all halve exactly is 4x4. SD3 16x16: 64 image tokens beside the 77 text tokens).

1. **LoRA overhead**: one forward with no LoRA, a merged LoRA and per-sample LoRA (rank 4; N rows, N subjects).
2. **HM-CFG in one call**: one denoising step of N subjects: HM-CFG's ``[B(∅); B(c); P(c)]`` in one call (3N rows,
   the base rows without LoRA: per-sample ``rows = -1``), against CFG with a merged LoRA (2N rows: the bare model's
   cost) and CFG with per-sample LoRA (2N rows); the bare model on 3N rows is what a third row costs by itself.
3. **Personalization**: the e2e hypernetwork built with the preset's settings (``configs/e2e_sdxl.yaml``,
   ``configs/e2e_sd3.yaml``: rank, d_model, layers, heads, targets) for the backbone's target shapes, with a CLIP
   ViT-L/14 vision tower (transformers' ``CLIPVisionModel`` from its config, random weights, saved with a
   ``CLIPImageProcessor`` to a temp folder and loaded by the hypernetwork as a real encoder folder), 224x224, batch 1:
   images → ``LoRAWeights`` against the encoder's forward alone.

Memory: one full-size model at a time (SDXL in fp32 is 10.3 GB). Every variant runs on that one model: the LoRA
contexts are entered before and left after each timed call, outside the timing. The per-sample LoRA is hyperbooth's
``apply_lora(mode="per_sample")`` (forward hooks). The merged LoRA is folded into the weights in place
(``W += ΔW``) and taken out again (``W -= ΔW``, equal up to float rounding), not with ``apply_lora(mode="merged")``,
whose bit-exact restore keeps a copy of every target weight (3.8 GB for SDXL, 3.6 GB for SD3) and would take the
SDXL run from 11 GB to about 15 GB; the merged forward computes exactly what hyperbooth's merged forward does (the
same weight tensors), and the merged row's "enter + exit" is this in-place fold, not hyperbooth's merge + restore.
Ratios are medians over rounds of this variant's time over the baseline's in the same round (a machine whose speed
drifts slows neighbouring calls alike). Before timing, a bare call of each batch size warms up; the first timed
round also checks that every LoRA changes the output, that merged and per-sample agree, and that HM-CFG's base rows
equal the bare model's.

Goals: merged ≤ 1.02x, per-sample rank 4 ≤ 1.15x; HM-CFG in one call ≤ 1.35x CFG's step; personalization ≤ 2x the
encoder's forward.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/backbone_overhead.py [--rounds 3] [--threads 1]
        [--backbones sdxl sd3] [--parts overhead hm personalize] [--sdxl-latent 8] [--sd3-latent 16]
        [--text-len 77] [--batches 1 4 8] [--subjects 1 4] [--tiny]

``--tiny`` runs the same code on the tiny SDXL/SD3/CLIP configs of :mod:`hyperbooth.tiny` (seconds; for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperbooth.backbones.sd3 import DEFAULT_SD3_TARGETS
from hyperbooth.guidance import cfg, hm_cfg
from hyperbooth.lora import DEFAULT_UNET_TARGETS, LoRAWeights, apply_lora, check_compatible, target_shapes
from hyperbooth.lora.inject import base_module
from hyperbooth.tiny import SDXL_UNET_CONFIG, TINY_SD3_TRANSFORMER_CONFIG, TINY_SDXL_UNET_CONFIG, TINY_VISION_CONFIG

ROOT = Path(__file__).resolve().parents[1]

#: stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (SD3Transformer2DModel).
SD3_MEDIUM_TRANSFORMER_CONFIG: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

#: CLIP ViT-L/14's vision tower (openai/clip-vit-large-patch14, vision_config).
CLIP_VIT_L14: dict = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                          patch_size=14, projection_dim=768)

#: The e2e decoder of ``--tiny`` (the presets' d_model 512 / 4 layers at full size).
TINY_E2E = {"d_model": 32, "layers": 1, "heads": 4}

GUIDANCE_SCALE, W_BASE, W_PERS = 3.0, 2.0, 2.0


# -- the two denoisers ------------------------------------------------------------------------------------------


@dataclass
class Denoiser:
    """How to build one backbone's denoiser and call it on N rows of random inputs."""

    name: str
    config: dict
    latent: int
    text_len: int
    targets: tuple[str, ...]
    preset: str  # configs/<preset>.yaml: the e2e hypernetwork's settings

    @property
    def is_sd3(self) -> bool:
        return "joint_attention_dim" in self.config

    def build(self, device: str | torch.device | None = None) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel, UNet2DConditionModel

        cls = SD3Transformer2DModel if self.is_sd3 else UNet2DConditionModel
        torch.manual_seed(0)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = cls(**self.config)
        return model.eval().requires_grad_(False)

    @property
    def spatial(self) -> str:
        s = f"{self.latent}x{self.latent}"
        if self.is_sd3:
            s += f" ({(self.latent // self.config['patch_size']) ** 2} tokens)"
        return s

    def inputs(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """N rows: latent ``x``, timestep ``t`` and the text conditioning (states, pooled, SDXL's time ids)."""
        c = self.config
        x = torch.randn(n, c["in_channels"], self.latent, self.latent, generator=g)
        if self.is_sd3:
            return {"x": x, "t": torch.full((n,), 500.0), "states": torch.randn(n, self.text_len, c["joint_attention_dim"], generator=g),
                    "pooled": torch.randn(n, c["pooled_projection_dim"], generator=g)}
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]  # SDXL: 2816 - 6 * 256 = 1280
        side = float(self.latent * 8)
        return {"x": x, "t": torch.full((n,), 500), "states": torch.randn(n, self.text_len, c["cross_attention_dim"], generator=g),
                "pooled": torch.randn(n, pooled, generator=g), "time_ids": torch.tensor([[side, side, 0, 0, side, side]]).repeat(n, 1)}

    def __call__(self, model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.is_sd3:
            return model(hidden_states=inp["x"], timestep=inp["t"], encoder_hidden_states=inp["states"], pooled_projections=inp["pooled"]).sample
        return model(inp["x"], inp["t"], encoder_hidden_states=inp["states"],
                     added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}).sample


def denoisers(args) -> dict[str, Denoiser]:
    sdxl = TINY_SDXL_UNET_CONFIG if args.tiny else SDXL_UNET_CONFIG
    sd3 = TINY_SD3_TRANSFORMER_CONFIG if args.tiny else SD3_MEDIUM_TRANSFORMER_CONFIG
    tiny = " (tiny)" if args.tiny else ""
    return {
        "sdxl": Denoiser("SDXL UNet" + tiny, sdxl, args.sdxl_latent, args.text_len, DEFAULT_UNET_TARGETS, "e2e_sdxl"),
        "sd3": Denoiser("SD3-medium transformer" + tiny, sd3, args.sd3_latent, args.text_len, DEFAULT_SD3_TARGETS, "e2e_sd3"),
    }


# -- LoRA contexts ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def merged_in_place(model: torch.nn.Module, weights: LoRAWeights):
    """One subject's LoRA folded into the target weights (``W += ΔW``) and taken out on exit (``W -= ΔW``: equal up to
    float rounding). The forward inside is hyperbooth's merged forward; without its saved copy of every target."""
    modules = check_compatible(model, weights)

    def fold(sign: float):
        for name, module in modules.items():
            w = base_module(module).weight
            w.add_(weights[name].delta()[0].view_as(w), alpha=sign)

    with torch.no_grad():
        fold(1.0)
    try:
        yield model
    finally:
        with torch.no_grad():
            fold(-1.0)


def lora_context(model, weights: LoRAWeights | None, mode: str, rows=None):
    if weights is None:
        return contextlib.nullcontext(model)
    if mode == "merged":
        return merged_in_place(model, weights)
    return apply_lora(model, weights, mode="per_sample", rows=rows)


@dataclass
class Variant:
    """A timed call ``fn(model)`` made inside ``lora_context(model, weights, mode, rows)``."""

    fn: Callable[[torch.nn.Module], torch.Tensor]
    weights: LoRAWeights | None = None
    mode: str = "none"
    rows: torch.Tensor | None = None


def run_rounds(model, variants: dict[str, Variant], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, torch.Tensor]]:
    """Each round: every variant once, its LoRA context entered before and left after the timed call (untimed).
    → (seconds per round, enter + exit seconds per round, each variant's output in the first round)."""
    times = {name: [] for name in variants}
    setup = {name: [] for name in variants}
    first = {}
    for r in range(rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            ctx = lora_context(model, v.weights, v.mode, v.rows)
            ctx.__enter__()
            t1 = time.perf_counter()
            try:
                out = v.fn(model)
                t2 = time.perf_counter()
            finally:
                t3 = time.perf_counter()
                ctx.__exit__(None, None, None)
                t4 = time.perf_counter()
            times[name].append(t2 - t1)
            setup[name].append((t1 - t0) + (t4 - t3))
            if r == 0:
                first[name] = out
    return times, setup, first


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``name``'s time over ``baseline``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def differs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check(ok: bool, what: str):
    if not ok:
        raise RuntimeError(f"benchmark self-check failed: {what}")


# -- 1. LoRA overhead -------------------------------------------------------------------------------------------


@torch.inference_mode()
def bench_overhead(d: Denoiser, model, batches: list[int], rank: int, rounds: int) -> list[tuple]:
    """Rows (N, mode, median ms, median paired ratio to none, median enter + exit ms)."""
    shapes = target_shapes(model, d.targets)
    rows = []
    for n in batches:
        g = torch.Generator().manual_seed(n)
        inp = d.inputs(n, g)
        lora = LoRAWeights.random(shapes, rank=rank, num_subjects=n, std=0.01, generator=g)
        d(model, inp)  # warm-up of this batch size
        call = lambda m: d(m, inp)  # noqa: E731
        variants = {"none": Variant(call), "merged": Variant(call, lora.select(0), "merged"), "per-sample": Variant(call, lora, "per_sample")}
        times, setup, out = run_rounds(model, variants, rounds)
        effect = differs(out["merged"][:1], out["none"][:1])
        check(effect > 0 and differs(out["per-sample"], out["none"]) > 0, f"{d.name}: the LoRA does not change the output (N={n})")
        check(differs(out["merged"][:1], out["per-sample"][:1]) < 0.1 * effect, f"{d.name}: merged and per-sample disagree on row 0 (N={n})")
        for mode, ts in times.items():
            rows.append((n, mode, statistics.median(ts) * 1e3, median_ratio(times, mode, "none"), statistics.median(setup[mode]) * 1e3))
    return rows


# -- 2. HM-CFG in one call --------------------------------------------------------------------------------------

CFG_MERGED = "CFG, LoRA merged (2N rows)"
CFG_PER_SAMPLE = "CFG, per-sample LoRA (2N rows)"
HM_ONE_CALL = "HM-CFG, one call (3N rows, base rows without LoRA)"
BARE_3N = "bare model, 3N rows, no LoRA (what a third row costs)"
TEXT_KEYS = ("states", "pooled")


def stack_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.inference_mode()
def bench_hm(d: Denoiser, model, subjects: list[int], rank: int, rounds: int) -> list[tuple]:
    """Rows (N, step, median ms, ratio to merged CFG, ratio to per-sample CFG)."""
    shapes = target_shapes(model, d.targets)
    rows = []
    for n in subjects:
        g = torch.Generator().manual_seed(100 + n)
        cond = d.inputs(n, g)
        uncond = {**cond, **{k: v for k, v in d.inputs(n, g).items() if k in TEXT_KEYS}}  # the same latents, the ∅ text
        in2, in3 = stack_rows([uncond, cond]), stack_rows([uncond, cond, cond])
        lora = LoRAWeights.random(shapes, rank=rank, num_subjects=n, std=0.01, generator=g)
        rows3 = torch.cat([torch.full((2 * n,), -1), torch.arange(n)])
        d(model, in2), d(model, in3)  # warm-up of both batch sizes

        def cfg_step(m):
            raw = d(m, in2)
            return raw, cfg(*raw.chunk(2), GUIDANCE_SCALE)

        def hm_step(m):
            raw = d(m, in3)
            return raw, hm_cfg(*raw.chunk(3), W_BASE, W_PERS)

        variants = {
            CFG_MERGED: Variant(cfg_step, lora.select(0), "merged"),
            CFG_PER_SAMPLE: Variant(cfg_step, lora, "per_sample"),
            HM_ONE_CALL: Variant(hm_step, lora, "per_sample", rows3),
            BARE_3N: Variant(lambda m: (d(m, in3), None)),
        }
        times, setup, out = run_rounds(model, variants, rounds)
        hm, bare, ps, merged = (out[k][0] for k in (HM_ONE_CALL, BARE_3N, CFG_PER_SAMPLE, CFG_MERGED))
        effect = differs(hm[2 * n:], bare[2 * n:])
        check(effect > 0, f"{d.name}: HM-CFG's personalized rows equal the bare model's (N={n})")
        check(differs(hm[: 2 * n], bare[: 2 * n]) < 1e-3 * effect + 1e-6, f"{d.name}: HM-CFG's base rows carry a LoRA (N={n})")
        check(differs(ps[n:], hm[2 * n:]) < 0.1 * effect, f"{d.name}: CFG's per-sample rows and HM-CFG's personalized rows disagree (N={n})")
        check(differs(merged[n:n + 1], ps[n:n + 1]) < 0.1 * effect, f"{d.name}: merged and per-sample CFG disagree (N={n})")
        for name, ts in times.items():
            rows.append((n, name, statistics.median(ts) * 1e3, median_ratio(times, name, CFG_MERGED), median_ratio(times, name, CFG_PER_SAMPLE)))
    return rows


# -- 3. personalization -----------------------------------------------------------------------------------------


def preset_hypernet(preset: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())["hypernet"]


def save_clip_encoder(folder: Path, tiny: bool) -> Path:
    """A CLIPVisionModel (ViT-L/14, or the tiny one) with random weights and a CLIPImageProcessor beside it."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = TINY_VISION_CONFIG if tiny else CLIP_VIT_L14
    side = config["image_size"]
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**config)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return folder


@torch.inference_mode()
def bench_personalize(d: Denoiser, encoder_folder: Path, tiny: bool, rounds: int) -> tuple[str, list[tuple]]:
    """(description, rows (name, median ms, ratio to the encoder's forward)) for the backbone's e2e hypernetwork."""
    from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork

    settings = preset_hypernet(d.preset)
    fields = {k: settings[k] for k in ("rank", "d_model", "layers", "heads", "multi_reference") if k in settings}
    if tiny:
        fields.update(TINY_E2E)
    targets = tuple(settings.get("targets") or d.targets)
    meta = d.build(device="meta")  # target shapes only
    shapes = target_shapes(meta, targets)
    del meta
    torch.manual_seed(0)
    hypernet = E2EHyperNetwork(E2EConfig(**fields, encoder=str(encoder_folder), targets=targets), shapes).eval()
    side = hypernet.encoder.image_size
    refs = torch.rand(1, 1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fns = {"image encoder forward": lambda: hypernet.encoder(refs.flatten(0, 1)), "images → LoRAWeights (encoder + decoder)": lambda: hypernet(refs)}
    weights = hypernet(refs)  # warm-up
    check(len(weights) == len(shapes) and weights.num_subjects == 1, f"{d.name}: the hypernetwork's LoRA does not cover the targets")
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    enc = sum(p.numel() for p in hypernet.encoder.parameters())
    dec = sum(p.numel() for n, p in hypernet.named_parameters() if not n.startswith("encoder."))
    about = (f"{d.name}: e2e ({d.preset}.yaml: rank {hypernet.config.rank}, d_model {hypernet.config.d_model}, {hypernet.config.layers} layers), "
             f"decoder {dec / 1e6:.1f}M params emitting LoRA for {len(shapes)} modules; encoder {enc / 1e6:.0f}M params at {side}x{side}")
    first = next(iter(fns))
    return about, [(name, statistics.median(ts) * 1e3, median_ratio(times, name, first)) for name, ts in times.items()]


# -- main -------------------------------------------------------------------------------------------------------


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", choices=["sdxl", "sd3"], default=["sdxl", "sd3"])
    parser.add_argument("--parts", nargs="+", choices=["overhead", "hm", "personalize"], default=["overhead", "hm", "personalize"])
    parser.add_argument("--sdxl-latent", type=int, default=8, help="SDXL latent side (its smallest with exact halving: 4)")
    parser.add_argument("--sd3-latent", type=int, default=16, help="SD3 latent side (patch 2: 16 gives 64 image tokens)")
    parser.add_argument("--text-len", type=int, default=77, help="text tokens (SD3's pipeline: 77 CLIP + 256 T5)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="N of the LoRA-overhead table")
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 4], help="N of the HM-CFG table")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the forward tables (after a warm-up call)")
    parser.add_argument("--encoder-rounds", type=int, default=5, help="timed rounds of the personalization table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--tiny", action="store_true", help="the tiny configs of hyperbooth.tiny (seconds; for tests)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.encoder_rounds < 1:
        parser.error("--threads, --rounds and --encoder-rounds must be at least 1")
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the temp encoder folder's save/load bars

    start = time.perf_counter()
    threads = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()} ({platform.machine()}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}, {threads} thread{'s' if threads > 1 else ''}, fp32, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC{', TINY configs' if args.tiny else ''}")
    print(f"command: {' '.join(['benchmarks/backbone_overhead.py'] + (argv if argv is not None else sys.argv[1:]))}")
    dens = denoisers(args)
    results = {"overhead": {}, "hm": {}, "personalize": {}}
    info = {}
    for key in args.backbones:
        d = dens[key]
        if not {"overhead", "hm"} & set(args.parts):
            break
        t0 = time.perf_counter()
        model = d.build()
        params = sum(p.numel() for p in model.parameters())
        ntargets = len(target_shapes(model, d.targets))
        info[key] = (params, ntargets)
        print(f"\n{d.name}: {fmt_params(params)} params, built in {time.perf_counter() - t0:.0f} s; latent {d.spatial}, {d.text_len} text tokens; "
              f"LoRA rank {args.rank} on {ntargets} modules ({', '.join(d.targets)})", flush=True)
        if "overhead" in args.parts:
            results["overhead"][key] = bench_overhead(d, model, args.batches, args.rank, args.rounds)
            print(f"  LoRA overhead done at {time.perf_counter() - start:.0f} s", flush=True)
        if "hm" in args.parts:
            results["hm"][key] = bench_hm(d, model, args.subjects, args.rank, args.rounds)
            print(f"  HM-CFG done at {time.perf_counter() - start:.0f} s", flush=True)
        del model
    if "personalize" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_clip_encoder(Path(tmp) / "clip", args.tiny)
            for key in args.backbones:
                results["personalize"][key] = bench_personalize(dens[key], folder, args.tiny, args.encoder_rounds)
        print(f"  personalization done at {time.perf_counter() - start:.0f} s", flush=True)

    per = f"{threads} thread{'s' if threads > 1 else ''}"
    if results["overhead"]:
        print(f"\n### LoRA overhead ({per}; medians of {args.rounds} paired rounds)\n")
        print(f"| backbone | params | latent | text tokens | LoRA modules | N (batch) | LoRA (rank {args.rank}) | forward ms (median) | ratio to none (median of paired rounds) | enter + exit ms (untimed) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for key, rows in results["overhead"].items():
            d, (params, ntargets) = dens[key], info[key]
            for n, mode, ms, ratio, setup_ms in rows:
                print(f"| {d.name} | {fmt_params(params)} | {d.spatial} | {d.text_len} | {ntargets} | {n} | {mode} | {ms:.1f} | {ratio:.3f}x | {setup_ms:.0f} |")
        print("goals: merged <= 1.02x, per-sample rank 4 <= 1.15x")
    if results["hm"]:
        print(f"\n### One denoising step: HM-CFG in one call ({per}; medians of {args.rounds} paired rounds)\n")
        print("| backbone | N subjects | one denoising step | ms (median) | ratio to CFG, merged LoRA | ratio to CFG, per-sample LoRA |")
        print("|---|---|---|---|---|---|")
        for key, rows in results["hm"].items():
            for n, name, ms, r_merged, r_ps in rows:
                print(f"| {dens[key].name} | {n} | {name} | {ms:.1f} | {r_merged:.3f}x | {r_ps:.3f}x |")
        print("goal: HM-CFG in one call <= 1.35x CFG's step")
    if results["personalize"]:
        print(f"\n### Personalization latency, batch 1 ({per}; medians of {args.encoder_rounds} paired rounds)\n")
        for key, (about, _) in results["personalize"].items():
            print(f"- {about}")
        print("\n| backbone | personalization | ms (median) | ratio to the encoder's forward (median of paired rounds) |\n|---|---|---|---|")
        for key, (_, rows) in results["personalize"].items():
            for name, ms, ratio in rows:
                print(f"| {dens[key].name} | {name} | {ms:.1f} | {ratio:.3f}x |")
        print("goal: personalization <= 2x the encoder's forward")
    print(f"\nwall time {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_gb():.2f} GB")
    return results


if __name__ == "__main__":
    main()
