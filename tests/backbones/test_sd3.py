"""Stable Diffusion 3 (a DiT, flow matching) as a backbone, on a tiny pipeline of SD3's own classes: the loader picks
it, hyperbooth's sampler against ``StableDiffusion3Pipeline.__call__``, HM-CFG's limiting case and its one batched
call, LoRA files in diffusers' layout read by ``load_lora_weights`` and in the ``lora_transformer_`` layout, the
flow-matching training batch of the engine, and ``hyperbooth train`` of e2e for two steps."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.backbones.sd3 import DEFAULT_SD3_TARGETS, StableDiffusion3Backbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.lora import LoRAWeights, load_lora, save_lora
from hyperbooth.methods import CONFIG_NAME
from hyperbooth.sampling import make_scheduler
from hyperbooth.tiny import tiny_sd3_pipeline
from hyperbooth.train.engine import load_train_config, train
from tests.train.conftest import write_photo

PROMPTS = ["a sks dog in the snow", "a red sks dog"]


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny ``StableDiffusion3Pipeline`` folder without T5 (``save_pretrained``)."""
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "sd3")


@pytest.fixture(scope="session")
def sd3(tiny_sd3):
    return load_backbone(tiny_sd3)


def _lora(sd3, n=1, seed=1, std=0.2):
    return LoRAWeights.random(sd3.target_shapes(), rank=2, num_subjects=n, std=std, generator=torch.Generator().manual_seed(seed))


def _pipeline_images(pipe, scheduler, steps, seed, guidance_scale, prompts=PROMPTS):
    """``StableDiffusion3Pipeline.__call__`` with hyperbooth's sampler of that name; images mapped to [-1, 1]."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, original)
    try:
        out = pipe(prompts, guidance_scale=guidance_scale, num_inference_steps=steps, height=16, width=16,
                   generator=torch.Generator().manual_seed(seed), output_type="pt")
    finally:
        pipe.scheduler = original
    return out.images * 2 - 1


def _fresh_pipe(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the backbone ------------------------------------------------------------------------------------------------------


def test_load_backbone_picks_sd3_and_its_transformer_targets(sd3):
    assert isinstance(sd3, StableDiffusion3Backbone) and sd3.name == "sd3" and sd3.denoiser == "transformer"
    assert sd3.unet is sd3.pipe.transformer and sd3.components == {"transformer": sd3.unet}
    assert sd3.prediction_type == "flow" and isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler)
    assert sd3.sample_shape == (16, 8, 8) and sd3.resolution == 16
    names = set(sd3.target_shapes())
    # block 0 has both streams' attention outputs and the image MLP; block 1 is "context pre-only" (no to_add_out)
    expected = {f"transformer_blocks.{b}.attn.{m}" for b in (0, 1) for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    expected |= {"transformer_blocks.0.attn.to_add_out"}
    expected |= {f"transformer_blocks.{b}.ff.{m}" for b in (0, 1) for m in ("net.0.proj", "net.2")}
    assert names == expected  # ff_context (the text stream's MLP) is not a target
    assert sd3.target_shapes(["to_q"]) == {f"transformer_blocks.{b}.attn.to_q": (32, 32) for b in (0, 1)}
    assert len(DEFAULT_SD3_TARGETS) == 10


def test_conditioning_is_the_pipelines_encode_prompt(sd3):
    cond = sd3.encode_prompts(PROMPTS)
    states, _, pooled, _ = sd3.pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert cond.states.shape == (2, 77 + 256, 96) and cond.added["pooled_projections"].shape == (2, 80)
    torch.testing.assert_close(cond.states, states, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["pooled_projections"], pooled, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no text-encoder LoRA"):
        sd3.encode_prompts(PROMPTS, lora=_lora(sd3))


def test_to_model_and_back_use_the_vae_shift_and_scale(sd3):
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    z = sd3.to_model(images)
    config = sd3.vae.config
    raw = sd3.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(z, (raw - config.shift_factor) * config.scaling_factor)
    torch.testing.assert_close(sd3.to_images(z), sd3.vae.decode(raw).sample)


# -- the sampler against diffusers' pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_cfg_equals_sd3_pipeline(sd3, scheduler):
    """Same seed, sampler and steps: the pipeline's images ("euler" is the pipeline's own FlowMatchEuler scheduler;
    "dpm++" is DPM-Solver++ in flow-sigma mode put into the pipeline)."""
    ours = generate(sd3, PROMPTS, None, guidance="cfg", guidance_scale=5.0, scheduler=scheduler, steps=4, seed=3)
    theirs = _pipeline_images(sd3.pipe, scheduler, steps=4, seed=3, guidance_scale=5.0)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    other = _pipeline_images(sd3.pipe, scheduler, steps=4, seed=3, guidance_scale=1.5)
    assert (ours - other).abs().max() > 1e-2  # the comparison can fail


def test_only_flow_samplers_are_offered(sd3):
    with pytest.raises(ConfigError, match="not a flow-matching sampler.*euler, dpm\\+\\+, unipc"):
        make_scheduler("ddim", sd3.scheduler)
    sampler = make_scheduler("euler", sd3.scheduler)
    assert type(sampler) is FlowMatchEulerDiscreteScheduler and sampler.config.shift == 3.0


# -- HM-CFG --------------------------------------------------------------------------------------------------------


def test_hm_cfg_with_w_pers_zero_is_cfg_in_one_call_per_step(sd3):
    weights = _lora(sd3, 2)
    calls = []
    handle = sd3.unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        hm = generate(sd3, PROMPTS, weights, guidance="hm-cfg", w_base=4.0, w_pers=0.0, scheduler="euler", steps=3, seed=2)
    finally:
        handle.remove()
    assert calls == [6, 6, 6]  # one transformer call per step: [B(∅); B(c); P(c)] for 2 prompts
    plain = generate(sd3, PROMPTS, None, guidance="cfg", guidance_scale=4.0, scheduler="euler", steps=3, seed=2)
    torch.testing.assert_close(hm, plain, rtol=0, atol=1e-5)
    personal = generate(sd3, PROMPTS, weights, guidance="hm-cfg", w_base=4.0, w_pers=1.0, scheduler="euler", steps=3, seed=2)
    assert (personal - plain).abs().max() > 1e-2


def test_apply_lora_restores_the_transformer_bit_for_bit(sd3):
    before = {k: v.clone() for k, v in sd3.unet.state_dict().items()}
    x, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([500.0]), sd3.encode_prompts(PROMPTS[:1])
    base = sd3.denoise(x, t, cond)
    for mode in ("per_sample", "merged"):
        for weights in (_lora(sd3), {"unet": _lora(sd3)}, {"transformer": _lora(sd3)}):  # a method's names, and the file's
            with sd3.apply_lora(weights, mode=mode):
                assert (sd3.denoise(x, t, cond) - base).abs().max() > 1e-3
    after = sd3.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="no component 'text_encoder'"):
        with sd3.apply_lora({"text_encoder": _lora(sd3)}):
            pass


# -- LoRA files ------------------------------------------------------------------------------------------------------


def test_diffusers_lora_file_loads_with_load_lora_weights(sd3, tiny_sd3, tmp_path):
    """A method's LoRA saved for the backbone is written as ``transformer.<module>.lora_A/B.weight``; diffusers'
    ``load_lora_weights`` reads it and its transformer predicts what hyperbooth's injector does, and its sampling
    equals hyperbooth's CFG with the LoRA."""
    weights = _lora(sd3)
    path = save_lora(tmp_path / "sd3.safetensors", weights, "diffusers", models=sd3.components, base_model="tiny-sd3")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys and all(k.startswith("transformer.") for k in keys)
    pipe = _fresh_pipe(tiny_sd3)
    pipe.load_lora_weights(str(path))
    x, t, cond = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 250.0]), sd3.encode_prompts(PROMPTS)
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.states,
                                  pooled_projections=cond.added["pooled_projections"]).sample
        with sd3.apply_lora(weights, mode="shared"):
            ours = sd3.denoise(x, t, cond)
        base = sd3.denoise(x, t, cond)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - base).abs().max() > 1e-2  # the LoRA acted
    images = generate(sd3, PROMPTS, weights, guidance="cfg", guidance_scale=4.0, scheduler="euler", steps=3, seed=5)
    torch.testing.assert_close(images, _pipeline_images(pipe, "euler", steps=3, seed=5, guidance_scale=4.0), rtol=0, atol=1e-4)

    loaded = load_lora(path, sd3.components)  # hyperbooth reads it back: the same ΔW, as the "transformer" component
    assert set(loaded.components) == {"transformer"} and loaded.unet is loaded.components["transformer"]
    for name, delta in weights.deltas().items():
        torch.testing.assert_close(loaded.unet.deltas()[name], delta, rtol=0, atol=1e-6)


def test_kohya_layout_names_diffusers_modules_under_lora_transformer(sd3, tmp_path):
    """``format="kohya"`` writes ``lora_transformer_<diffusers module with . → _>`` (down/up/alpha), the SD3 layout
    ComfyUI reads (OneTrainer's); it reads back with or without the model."""
    weights = _lora(sd3, seed=4)
    path = save_lora(tmp_path / "sd3_kohya.safetensors", {"unet": weights}, "kohya", models=sd3.components, base_model="tiny-sd3")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {"lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight", "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight",
            "lora_transformer_transformer_blocks_0_attn_to_q.alpha", "lora_transformer_transformer_blocks_1_ff_net_0_proj.lora_down.weight"} <= keys
    assert all(k.startswith("lora_transformer_") for k in keys) and set(json.loads(meta["hyperbooth.targets"])) == {"transformer"}
    for models in (None, sd3.components):
        loaded = load_lora(path, models)
        assert loaded.format == "kohya" and set(loaded.components) == {"transformer"}
        for name, delta in weights.deltas().items():
            torch.testing.assert_close(loaded.unet.deltas()[name], delta, rtol=0, atol=1e-6)
    # `hyperbooth lora convert` to diffusers' layout keeps the component: transformer.… keys, the same ΔW
    from hyperbooth.cli import main

    converted = tmp_path / "converted.safetensors"
    assert main(["lora", "convert", str(path), str(converted), "--format", "diffusers"]) == 0
    with safe_open(str(converted), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    for name, delta in weights.deltas().items():
        torch.testing.assert_close(load_lora(converted, sd3.components).unet.deltas()[name], delta, rtol=0, atol=1e-5)


# -- training --------------------------------------------------------------------------------------------------------


def test_train_e2e_two_steps_with_the_flow_matching_batch(sd3, tiny_sd3, clip_encoder, tmp_path, monkeypatch):
    """``hyperbooth train`` of e2e on the tiny SD3 folder: two steps, a hypernetwork for its transformer; every
    training batch is the flow-matching one (t = σ·1000 on the shifted schedule, x_t = (1 − σ) x0 + σ ε, target ε − x0)."""
    from hyperbooth.train import engine

    for name, color in (("red_toy", (220, 30, 30)), ("blue_toy", (30, 30, 220))):
        for i in range(2):
            write_photo(tmp_path / "subjects" / name / f"{i:02d}.png", color, shift=i)
    seen = []
    original = engine.make_batch
    monkeypatch.setattr(engine, "make_batch", lambda *args: seen.append(original(*args)) or seen[-1])
    args = ["hypernet={d_model: 32, layers: 1, heads: 2, rank: 2}", f"hypernet.encoder={clip_encoder}", f"base_model={tiny_sd3}",
            "data.kind=dreambench", f"data.path={tmp_path / 'subjects'}", "data.class_name=toy", "data.k=1", "data.num_workers=0",
            "optim.batch_size=2", "optim.warmup_steps=1", "optim.max_steps=2", "log_every=1", "checkpoint_every=2", f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="min_snr_gamma=5: .*flow matching"):  # the default Min-SNR weighting is refused, named
        train(load_train_config(None, args))
    folder = train(load_train_config(None, [*args, "min_snr_gamma=0"]))

    assert len(seen) == 2
    schedule = FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps  # the shifted σ·1000 a uniform index picks from
    for batch in seen:
        assert batch.t.dtype == torch.float32 and all(bool((schedule == v).any()) for v in batch.t)
        sigma = (batch.t / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(batch.x_t, (1 - sigma) * batch.x0 + sigma * batch.noise)
        torch.testing.assert_close(batch.target, batch.noise - batch.x0)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["backbone"] == "sd3" and set(meta["target_shapes"]) == set(sd3.target_shapes())
    hypernet = methods.load(folder)
    hypernet.check_backbone(sd3)
    weights = hypernet.personalize(torch.rand(1, 1, 3, 16, 16) * 2 - 1, sd3)
    assert any(d.abs().sum() > 0 for d in weights.deltas().values())  # it learned a ΔW ≠ 0 for the transformer
    images = generate(sd3, PROMPTS[:1], weights, guidance="hm-cfg", scheduler="euler", steps=2, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


# -- the command line ------------------------------------------------------------------------------------------------


def test_cli_personalize_then_generate_with_the_file(sd3, tiny_sd3, clip_encoder, ref_pngs, tmp_path):
    """`hyperbooth personalize` on the SD3 folder writes the transformer's LoRA (``transformer.…`` keys, component
    "transformer" in the header); `hyperbooth generate --lora` samples with it what the library does (default
    sampler: DPM-Solver++ in flow mode)."""
    import numpy as np
    from PIL import Image

    from hyperbooth.cli import main
    from hyperbooth.grids import to_uint8
    from hyperbooth.personalize import load_personalizer, personalize
    from tests.backbones.conftest import make_sd_hypernet

    hypernet = make_sd_hypernet(sd3, clip_encoder, tmp_path / "hypernet")
    lora = tmp_path / "s.safetensors"
    assert main(list(map(str, ["personalize", "--model", tiny_sd3, "--hypernet", hypernet, "--images", *ref_pngs, "--out", lora]))) == 0
    with safe_open(str(lora), framework="pt") as f:
        header, keys = f.metadata(), list(f.keys())
    assert header["hyperbooth.backbone"] == "sd3" and set(json.loads(header["hyperbooth.targets"])) == {"transformer"}
    assert keys and all(k.startswith("transformer.") for k in keys)
    weights, _ = personalize(ref_pngs, load_personalizer(hypernet), sd3)
    torch.testing.assert_close(load_lora(lora, sd3.components).unet.deltas()["transformer_blocks.0.attn.to_q"],
                               weights.select(0).deltas()["transformer_blocks.0.attn.to_q"], rtol=0, atol=1e-5)

    out = tmp_path / "outs"
    args = ["generate", "--model", tiny_sd3, "--lora", lora, "--guidance", "hm-cfg", "--prompt", PROMPTS[1], "--steps", 2, "--seed", 1, "--out", f"{out}/"]
    assert main(list(map(str, args))) == 0
    got = np.asarray(Image.open(out / "00_a-red-sks-dog_seed1.png")).astype(int)
    expected = to_uint8(generate(sd3, PROMPTS[1:], weights, guidance="hm-cfg", steps=2, seed=1))[0]
    assert np.abs(got - expected).max() <= 1


def test_dreambooth_lora_finetunes_the_transformer_with_the_flow_objective(sd3, tmp_path):
    """The DreamBooth-LoRA ceiling on SD3: two steps with prior preservation (class images sampled by the flow
    sampler), a LoRA of the transformer's targets that moved, saved under ``transformer.``."""
    from hyperbooth.methods.dreambooth_lora import FinetuneConfig, finetune

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    cfg = FinetuneConfig(steps=2, rank=2, lr=1e-2, prior_preservation=True, num_class_images=2, class_sample_steps=2)
    weights, stats = finetune(sd3, images, "dog", cfg)
    assert set(weights) == set(sd3.target_shapes()) and len(stats.losses) == 2 and all(torch.isfinite(torch.tensor(stats.losses)))
    assert any(d.abs().sum() > 0 for d in weights.deltas().values())
    path = save_lora(tmp_path / "db.safetensors", weights, models={sd3.denoiser: sd3.unet})
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
