"""Stable Diffusion 1.5 as a backbone, on a tiny pipeline of SD 1.5's own classes: hyperbooth's sampler against
``StableDiffusionPipeline.__call__``, HM-CFG's limiting case and its one batched call, per-sample LoRA rows, the
text-encoder LoRA, and the backbone's spaces."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hyperbooth.backbones import StableDiffusionBackbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.guidance import hm_cfg
from hyperbooth.lora import DEFAULT_TEXT_ENCODER_TARGETS, LoRAWeights, save_lora, target_shapes
from hyperbooth.sampling import make_scheduler
from tests.backbones.conftest import pipeline_images

PROMPTS = ["a sks dog in the snow", "a red sks dog"]


def _unet_lora(sd, n=1, seed=1, std=0.2):
    return LoRAWeights.random(sd.target_shapes(), rank=2, num_subjects=n, std=std, generator=torch.Generator().manual_seed(seed))


def _text_lora(sd, n=1, seed=2, std=0.3):
    shapes = target_shapes(sd.text_encoder, DEFAULT_TEXT_ENCODER_TARGETS)
    return LoRAWeights.random(shapes, rank=2, num_subjects=n, std=std, generator=torch.Generator().manual_seed(seed))


def _pipeline_images(pipe, scheduler, steps, seed, guidance_scale, prompts=PROMPTS):
    return pipeline_images(pipe, scheduler, steps, seed, guidance_scale, prompts)


# -- the sampler against diffusers' pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler-a"])
def test_cfg_equals_stable_diffusion_pipeline(sd, scheduler):
    """Same seed (a CPU generator), scheduler and steps: the same images as the pipeline (euler-a draws noise at every
    step from the same generator, so the order of the draws is checked too)."""
    assert isinstance(sd, StableDiffusionBackbone)
    ours = generate(sd, PROMPTS, None, guidance="cfg", guidance_scale=5.0, scheduler=scheduler, steps=4, seed=3)
    theirs = _pipeline_images(sd.pipe, scheduler, steps=4, seed=3, guidance_scale=5.0)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the comparison can fail: another seed, scale or step count is another image
    other = _pipeline_images(sd.pipe, scheduler, steps=4, seed=3, guidance_scale=1.5)
    assert (ours - other).abs().max() > 1e-2
    assert (ours - generate(sd, PROMPTS, None, guidance="cfg", guidance_scale=5.0, scheduler=scheduler, steps=4, seed=4)).abs().max() > 1e-2


def test_cfg_with_unet_and_text_encoder_lora_equals_pipeline_with_load_lora_weights(sd, tiny_sd, tmp_path):
    """A LoRA file of both components, read by diffusers' ``load_lora_weights``: the pipeline samples what
    hyperbooth's CFG samples with the same weights (the text-encoder LoRA conditions both of CFG's rows there too)."""
    weights = {"unet": _unet_lora(sd), "text_encoder": _text_lora(sd)}
    path = save_lora(tmp_path / "both.safetensors", weights, "diffusers", models=sd.components)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    theirs = _pipeline_images(pipe, "dpm++", steps=3, seed=5, guidance_scale=4.0)
    ours = generate(sd, PROMPTS, weights, guidance="cfg", guidance_scale=4.0, scheduler="dpm++", steps=3, seed=5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    unet_only = generate(sd, PROMPTS, {"unet": weights["unet"]}, guidance="cfg", guidance_scale=4.0, scheduler="dpm++", steps=3, seed=5)
    assert (ours - unet_only).abs().max() > 1e-2  # the text-encoder part acted


# -- HM-CFG --------------------------------------------------------------------------------------------------------


def test_hm_cfg_with_w_pers_zero_is_cfg(sd):
    for weights in (_unet_lora(sd, 2), {"unet": _unet_lora(sd, 2), "text_encoder": _text_lora(sd, 2)}):
        hm = generate(sd, PROMPTS, weights, guidance="hm-cfg", w_base=4.0, w_pers=0.0, steps=3, seed=2)
        plain = generate(sd, PROMPTS, None, guidance="cfg", guidance_scale=4.0, steps=3, seed=2)
        torch.testing.assert_close(hm, plain, rtol=0, atol=1e-5)
        assert (generate(sd, PROMPTS, weights, guidance="hm-cfg", w_base=4.0, w_pers=1.0, steps=3, seed=2) - plain).abs().max() > 1e-2


def test_hm_cfg_one_call_equals_three_separate_unet_evaluations(sd):
    """One UNet call of 3N rows per step (counted by a hook) gives what a loop of three separate evaluations,
    ε_B(∅), ε_B(c) and ε_P(c) with the LoRA, combined by ``hm_cfg``, gives."""
    w = _unet_lora(sd, 2)
    n, steps, w_base, w_pers = len(PROMPTS), 4, 2.0, 1.5
    calls = []
    handle = sd.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        one_call = generate(sd, PROMPTS, w, guidance="hm-cfg", w_base=w_base, w_pers=w_pers, scheduler="dpm++", steps=steps, seed=6)
    finally:
        handle.remove()
    assert calls == [3 * n] * steps

    # the reference: three UNet calls per step, written out with the scheduler's own API
    scheduler = make_scheduler("dpm++", sd.scheduler)
    scheduler.set_timesteps(steps)
    uncond, cond = sd.encode_prompts([""] * n), sd.encode_prompts(PROMPTS)
    x = torch.randn((n, *sd.sample_shape), generator=torch.Generator().manual_seed(6)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            base_uncond = sd.unet(x_in, t, encoder_hidden_states=uncond.states).sample
            base_cond = sd.unet(x_in, t, encoder_hidden_states=cond.states).sample
            with sd.apply_lora(w, mode="per_sample"):
                pers_cond = sd.unet(x_in, t, encoder_hidden_states=cond.states).sample
            x = scheduler.step(hm_cfg(base_uncond, base_cond, pers_cond, w_base, w_pers), t, x).prev_sample
        reference = sd.to_images(x).clamp(-1, 1)
    torch.testing.assert_close(one_call, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance", ["cfg", "hm-cfg"])
def test_per_sample_rows_of_several_subjects_equal_separate_runs(sd, guidance):
    """Prompt i with subject i in one batch = the run where subject i serves every prompt, row i (same noise)."""
    for w in (_unet_lora(sd, 2, std=0.3), {"unet": _unet_lora(sd, 2, std=0.3), "text_encoder": _text_lora(sd, 2)}):
        both = generate(sd, PROMPTS, w, guidance=guidance, steps=3, seed=1)
        one = {c: x.select(0) for c, x in w.items()} if isinstance(w, dict) else w.select(0)
        for i in range(2):
            alone = generate(sd, PROMPTS, {c: x.select(i) for c, x in w.items()} if isinstance(w, dict) else w.select(i),
                             guidance=guidance, steps=3, seed=1)  # one subject (merged under CFG)
            torch.testing.assert_close(both[i], alone[i], rtol=0, atol=1e-5)
        assert (both[1] - generate(sd, PROMPTS, one, guidance=guidance, steps=3, seed=1)[1]).abs().max() > 1e-2


def test_text_encoder_lora_conditions_only_the_personalized_rows(sd):
    """HM-CFG rows [B(∅); B(c); P(c)]: a text-encoder LoRA changes the states of the last N rows only; under CFG it
    changes every row (both belong to the personalized model)."""
    unet_lora, text_lora = _unet_lora(sd, 1), _text_lora(sd, 1)
    n = len(PROMPTS)

    def states_of(weights, guidance):
        seen = []

        def hook(module, args, kwargs):
            seen.append(kwargs["encoder_hidden_states"].clone())

        handle = sd.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            images = generate(sd, PROMPTS, weights, guidance=guidance, steps=2, seed=0)
        finally:
            handle.remove()
        return seen[0], images

    plain, plain_images = states_of({"unet": unet_lora}, "hm-cfg")
    with_text, text_images = states_of({"unet": unet_lora, "text_encoder": text_lora}, "hm-cfg")
    assert plain.shape[0] == with_text.shape[0] == 3 * n
    assert torch.equal(with_text[: 2 * n], plain[: 2 * n])  # the base model's rows: untouched
    assert (with_text[2 * n :] - plain[2 * n :]).abs().amax(dim=(1, 2)).min() > 1e-3  # every personalized row
    assert (text_images - plain_images).abs().max() > 1e-3
    cfg_plain, _ = states_of({"unet": unet_lora}, "cfg")
    cfg_text, _ = states_of({"unet": unet_lora, "text_encoder": text_lora}, "cfg")
    assert (cfg_text - cfg_plain).abs().amax(dim=(1, 2)).min() > 1e-3
    # the text encoder is as before
    torch.testing.assert_close(sd.encode_prompts(PROMPTS).states, plain[n : 2 * n], rtol=0, atol=0)


def test_text_encoder_lora_gets_gradients_and_the_encoder_none(sd):
    """A method that predicts a text-encoder LoRA trains through ``encode_prompts(prompts, lora=…)``."""
    lora = _text_lora(sd, 2).map(lambda layer: type(layer)(layer.A.clone().requires_grad_(), layer.B.clone().requires_grad_(), layer.alpha))
    states = sd.encode_prompts(PROMPTS, lora=lora).states
    states.square().mean().backward()
    first = next(iter(lora.values()))
    assert first.A.grad is not None and first.A.grad.abs().max() > 0 and first.B.grad.abs().max() > 0
    assert all(p.grad is None for p in sd.text_encoder.parameters())
    assert not sd.encode_prompts(PROMPTS).states.requires_grad


def test_lora_scale_acts_on_every_component(sd):
    weights = {"unet": _unet_lora(sd), "text_encoder": _text_lora(sd)}
    zero = generate(sd, PROMPTS, weights, guidance="cfg", lora_scale=0.0, steps=2, seed=0)
    torch.testing.assert_close(zero, generate(sd, PROMPTS, None, guidance="cfg", steps=2, seed=0), rtol=0, atol=1e-5)


def test_hm_cfg_without_a_lora_is_refused(sd):
    """No silent replacement of the guidance asked for."""
    with pytest.raises(ConfigError, match="hm-cfg.*needs a personalized model"):
        generate(sd, PROMPTS, None, guidance="hm-cfg", steps=1)
    with pytest.raises(ConfigError, match="hm-cfg.*needs a personalized model"):
        generate(sd, PROMPTS, {}, guidance="hm-cfg", steps=1)
    with pytest.raises(ConfigError, match="no component 'vae'"):
        generate(sd, PROMPTS, {"vae": _unet_lora(sd)}, steps=1)


# -- the backbone's spaces and the model left as it was ----------------------------------------------------------


def test_spaces_shapes_and_conditioning(sd):
    assert sd.name == "sd15" and sd.resolution == 16 and sd.spatial_factor == 2
    assert sd.sample_shape == (4, 8, 8) and sd.prediction_type == "epsilon" and sd.num_train_timesteps == 1000
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        x0 = sd.to_model(images)
        back = sd.to_images(x0)
    assert x0.shape == (3, *sd.sample_shape) and back.shape == images.shape
    assert torch.isfinite(back).all()
    cond = sd.encode_prompts(PROMPTS)
    assert cond.states.shape == (2, 77, 32) and cond.mask is None and len(cond) == 2
    assert set(sd.components) == {"unet", "text_encoder"}
    assert set(sd.target_shapes()) and all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in sd.target_shapes())


def test_apply_lora_leaves_the_model_unchanged(sd):
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
    x = torch.randn(2, *sd.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400, 400])
    cond = sd.encode_prompts(PROMPTS)
    with torch.no_grad():
        plain = sd.denoise(x, t, cond)
        for mode in ("merged", "per_sample"):
            with sd.apply_lora(_unet_lora(sd), mode=mode):
                assert (sd.denoise(x, t, cond) - plain).abs().max() > 1e-3
        generate(sd, PROMPTS, {"unet": _unet_lora(sd), "text_encoder": _text_lora(sd)}, steps=1)
        assert torch.equal(sd.denoise(x, t, cond), plain)
    assert all(torch.equal(before[k], v) for k, v in sd.unet.state_dict().items())
    assert all(torch.equal(text_before[k], v) for k, v in sd.text_encoder.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in sd.unet.modules())
