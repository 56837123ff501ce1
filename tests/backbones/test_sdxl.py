"""Stable Diffusion XL as a backbone, on a tiny pipeline of SDXL's own classes: the conditioning against
``StableDiffusionXLPipeline.encode_prompt``, hyperbooth's sampler against the pipeline's, LoRA files in both layouts
read by ``load_lora_weights`` (kohya's SDXL names), HM-CFG's one call, the text-encoder LoRAs, and files of the other
SD family refused naming the key."""

import json
import re
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
from safetensors import safe_open

from hyperbooth.backbones import StableDiffusionXLBackbone, backbone_class, load_backbone
from hyperbooth.errors import CheckpointError, LoRAFileError
from hyperbooth.generate import generate
from hyperbooth.lora import DEFAULT_TEXT_ENCODER_TARGETS, LoRAInjector, LoRAWeights, load_lora, save_lora, target_shapes
from hyperbooth.lora.sgm import SDXL_LAYOUT, UNetLayout, to_sgm
from hyperbooth.tiny import SDXL_UNET_CONFIG, tiny_sdxl_pipeline
from tests.backbones.conftest import pipeline_images

PROMPTS = ["a sks dog in the snow", "a red sks dog"]
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_backbone(tiny_sdxl)


def _pipe(folder, **kwargs):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(model, targets, n=1, seed=1, std=0.2, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights.random(target_shapes(model, targets), rank=2, num_subjects=n, std=std, alpha=alpha, generator=g)


def _all_loras(sdxl, n=1, seed=1):
    return {"unet": _lora(sdxl.unet, UNET_TARGETS, n, seed, alpha=3.0), "text_encoder": _lora(sdxl.text_encoder, DEFAULT_TEXT_ENCODER_TARGETS, n, seed + 1, 0.3),
            "text_encoder_2": _lora(sdxl.text_encoder_2, DEFAULT_TEXT_ENCODER_TARGETS, n, seed + 2, 0.3)}


def _pipeline_images(pipe, scheduler, steps, seed, guidance_scale, prompts=PROMPTS):
    return pipeline_images(pipe, scheduler, steps, seed, guidance_scale, prompts)


def test_loads_as_the_sdxl_backbone(sdxl, tiny_sdxl):
    assert type(sdxl) is StableDiffusionXLBackbone and backbone_class("StableDiffusionXLPipeline") is StableDiffusionXLBackbone
    assert sdxl.name == "sdxl" and sdxl.resolution == 16 and sdxl.sample_shape == (4, 8, 8) and sdxl.path == tiny_sdxl
    assert set(sdxl.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert not any(p.requires_grad for m in sdxl.components.values() for p in m.parameters())


def test_a_damaged_sdxl_folder_is_named(tiny_sdxl, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_sdxl, damaged)
    shutil.rmtree(damaged / "text_encoder_2")
    with pytest.raises(CheckpointError, match="Stable Diffusion XL pipeline folder '" + re.escape(str(damaged)) + "' cannot be loaded"):
        load_backbone(damaged)


def test_conditioning_equals_the_pipelines_encode_prompt(sdxl, tiny_sdxl):
    """States, pooled embedding and time ids as ``encode_prompt`` / ``_get_add_time_ids``; the empty prompt as the
    pipeline's unconditional branch: zeros with ``force_zeros_for_empty_prompt`` (SDXL's folders), encoded without."""
    pipe = sdxl.pipe
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        cond, uncond = sdxl.encode_prompts(PROMPTS), sdxl.encode_prompts(["", ""])
    assert cond.states.shape == (2, 77, 32 + 48) and cond.mask is None and set(cond.added) == {"text_embeds", "time_ids"}
    torch.testing.assert_close(cond.states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(uncond.states, neg_embeds, rtol=0, atol=0)  # zeros
    torch.testing.assert_close(uncond.added["text_embeds"], neg_pooled, rtol=0, atol=0)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=embeds.dtype, text_encoder_projection_dim=24)
    torch.testing.assert_close(cond.added["time_ids"], time_ids.repeat(2, 1), rtol=0, atol=0)
    torch.testing.assert_close(uncond.added["time_ids"], time_ids.repeat(2, 1), rtol=0, atol=0)

    encoded = _pipe(tiny_sdxl, force_zeros_for_empty_prompt=False)
    backbone = StableDiffusionXLBackbone(encoded, tiny_sdxl)
    with torch.no_grad():
        _, neg_embeds, _, neg_pooled = encoded.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        uncond = backbone.encode_prompts(["", ""])
    assert neg_embeds.abs().max() > 0
    torch.testing.assert_close(uncond.states, neg_embeds, rtol=0, atol=0)
    torch.testing.assert_close(uncond.added["text_embeds"], neg_pooled, rtol=0, atol=0)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_cfg_equals_the_sdxl_pipeline(sdxl, scheduler):
    ours = generate(sdxl, PROMPTS, None, guidance="cfg", guidance_scale=5.0, scheduler=scheduler, steps=3, seed=3)
    theirs = _pipeline_images(sdxl.pipe, scheduler, steps=3, seed=3, guidance_scale=5.0)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    other = _pipeline_images(sdxl.pipe, scheduler, steps=3, seed=3, guidance_scale=1.5)
    assert (ours - other).abs().max() > 1e-2  # the comparison can fail


# -- LoRA files -------------------------------------------------------------------------------------------------------


def test_sgm_names_of_sdxl_unet_are_kohyas_and_diffusers_reads_them_back():
    """SDXL 1.0's real UNet (built on the meta device: names only): the SGM names of known modules, and diffusers'
    own converter maps every SGM-named key to what it maps the diffusers-named key to."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    layout = UNetLayout.from_config(unet.config)
    assert layout == SDXL_LAYOUT
    known = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k": "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
        "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2",
    }
    assert {name: to_sgm(name, layout) for name in known} == known
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    sgm = {n: to_sgm(n, layout) for n in layers}
    assert len(layers) > 700 and None not in sgm.values() and len(set(sgm.values())) == len(sgm)

    def diffusers_reads(name):
        state = _maybe_map_sgm_blocks_to_diffusers({f"lora_unet_{name.replace('.', '_')}.lora_down.weight": torch.zeros(1)}, unet.config)
        return _convert_unet_lora_key(next(iter(state)))

    # every layer as diffusers reads the module's own name, but add_embedding, whose diffusers spelling its converter
    # mangles (kohya's SDXL files never use it): the SGM one arrives right
    assert {n: diffusers_reads(s) for n, s in sgm.items() if not n.startswith("add_embedding")} == {
        n: diffusers_reads(n) for n in sgm if not n.startswith("add_embedding")}
    assert diffusers_reads(sgm["add_embedding.linear_1"]) == "add_embedding.linear_1.lora.down.weight"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_file_loads_in_the_pipeline_with_our_unet_output_and_images(sdxl, tiny_sdxl, tmp_path, fmt):
    """A file of all three components, read by ``StableDiffusionXLPipeline.load_lora_weights``: the UNet output of
    hyperbooth's injector (1e-4), and the images of hyperbooth's CFG with the same weights; read back by hyperbooth,
    the same ΔW."""
    weights = _all_loras(sdxl)
    path = save_lora(tmp_path / f"{fmt}.safetensors", weights, fmt, models=sdxl.components, backbone="sdxl", base_model="tiny-sdxl")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    cond = sdxl.encode_prompts(PROMPTS)
    with torch.no_grad(), LoRAInjector(sdxl.unet).apply(weights["unet"], mode="shared"):
        ours = sdxl.denoise(x, t, cond)
    pipe = _pipe(tiny_sdxl)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = pipe.unet(x, t, **cond.unet_kwargs()).sample
        base = sdxl.denoise(x, t, cond)
    assert (ours - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max().item() <= 1e-4

    images = _pipeline_images(pipe, "euler", steps=2, seed=5, guidance_scale=4.0)
    torch.testing.assert_close(generate(sdxl, PROMPTS, weights, guidance="cfg", guidance_scale=4.0, scheduler="euler", steps=2, seed=5), images, rtol=0, atol=1e-5)

    for models in (None, sdxl.components):  # our own file needs no model to map its names back
        loaded = load_lora(path, models)
        assert loaded.metadata["hyperbooth.backbone"] == "sdxl" and set(loaded.components) == set(weights)
        for comp, w in weights.items():
            got = loaded.components[comp].deltas()
            assert set(got) == set(w)
            for name, d in w.deltas().items():
                torch.testing.assert_close(got[name], d, rtol=1e-5, atol=1e-7)


def test_kohya_file_uses_kohyas_sdxl_names(sdxl, tmp_path):
    weights = _all_loras(sdxl)
    path = save_lora(tmp_path / "k.safetensors", weights, "kohya", models=sdxl.components, backbone="sdxl")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = {k.split(".")[0] for k in keys}
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "lora_unet_middle_block_1_proj_in",
            "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0", "lora_unet_output_blocks_2_1_proj_out",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"} <= modules
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_")) for m in modules)
    assert len(modules) == sum(len(w) for w in weights.values())
    assert meta["hyperbooth.backbone"] == "sdxl" and json.loads(meta["hyperbooth.unet_layout"])["layers_per_block"] == [2, 2]
    # the same weights for SD-1-style naming (no backbone): diffusers' module names, one text encoder prefix
    flat = save_lora(tmp_path / "flat.safetensors", {"unet": weights["unet"]}, "kohya", models=sdxl.components)
    with safe_open(str(flat), "pt") as f:
        assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in f.keys())
    # a kohya file without hyperbooth's header (a foreign one) resolves its SGM names against the model
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))
    loaded = load_lora(bare, sdxl.components)
    assert set(loaded.components["unet"]) == set(weights["unet"]) and set(loaded.components["text_encoder_2"]) == set(weights["text_encoder_2"])
    with pytest.raises(LoRAFileError, match="cannot resolve key .lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight.*needs the model"):
        load_lora(bare)


def test_a_file_of_the_other_sd_family_is_refused_naming_the_first_key(sdxl, sd, tmp_path):
    """An SD 1.5 LoRA given to SDXL, and the other way round, in both layouts: one error naming the first key that
    does not fit, and the backbone the file was made for."""
    sd_lora = _lora(sd.unet, UNET_TARGETS)
    xl_lora = _lora(sdxl.unet, UNET_TARGETS)
    for fmt, first_sd, first_xl in (
        ("diffusers", "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"),
        ("kohya", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"),
    ):
        sd_file = save_lora(tmp_path / f"sd_{fmt}.safetensors", sd_lora, fmt, models=sd.components, backbone="sd15")
        with pytest.raises(LoRAFileError, match=re.escape(f"key '{first_sd}'") + ".*does not exist in UNet2DConditionModel.*made for the sd15 backbone"):
            load_lora(sd_file, sdxl.components)
        xl_file = save_lora(tmp_path / f"xl_{fmt}.safetensors", xl_lora, fmt, models=sdxl.components, backbone="sdxl")
        with pytest.raises(LoRAFileError, match=re.escape(f"key '{first_xl}'") + ".*made for the sdxl backbone"):
            load_lora(xl_file, sd.components)


# -- HM-CFG and the text-encoder LoRAs ----------------------------------------------------------------------------------


def test_hm_cfg_is_one_call_and_its_limit_is_cfg(sdxl):
    weights = _all_loras(sdxl, n=2)
    calls = []
    handle = sdxl.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (args[0].shape[0], kwargs["added_cond_kwargs"]["text_embeds"].shape[0])), with_kwargs=True)
    try:
        hm = generate(sdxl, PROMPTS, weights, guidance="hm-cfg", w_base=4.0, w_pers=1.5, steps=3, seed=2)
    finally:
        handle.remove()
    assert calls == [(6, 6)] * 3  # [B(∅); B(c); P(c)] in one call per step, pooled embeddings and time ids alongside
    plain = generate(sdxl, PROMPTS, None, guidance="cfg", guidance_scale=4.0, steps=3, seed=2)
    torch.testing.assert_close(generate(sdxl, PROMPTS, weights, guidance="hm-cfg", w_base=4.0, w_pers=0.0, steps=3, seed=2), plain, rtol=0, atol=1e-5)
    assert (hm - plain).abs().max() > 1e-2
    # no hook left behind (transformers' own output-capturing hooks, installed once for output_hidden_states, aside)
    hooks = [h for c in sdxl.components.values() for m in c.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert not [h for h in hooks if "output_capturing_hook" not in h.__qualname__]


def test_text_encoder_loras_act_train_and_leave_the_encoders_as_they_were(sdxl):
    before = sdxl.encode_prompts(PROMPTS)
    loras = _all_loras(sdxl, n=2)
    for comp in ("text_encoder", "text_encoder_2"):
        lora = loras[comp].map(lambda layer: type(layer)(layer.A.clone().requires_grad_(), layer.B.clone().requires_grad_(), layer.alpha))
        cond = sdxl.encode_prompts(PROMPTS, lora={comp: lora})
        width = slice(0, 32) if comp == "text_encoder" else slice(32, 80)
        other = slice(32, 80) if comp == "text_encoder" else slice(0, 32)
        assert (cond.states[..., width] - before.states[..., width]).abs().amax(dim=(1, 2)).min() > 1e-3
        torch.testing.assert_close(cond.states[..., other].detach(), before.states[..., other], rtol=0, atol=0)
        pooled_moved = (cond.added["text_embeds"] - before.added["text_embeds"]).abs().max() > 1e-4
        assert pooled_moved == (comp == "text_encoder_2")  # the pooled embedding is the second encoder's
        (cond.states.square().mean() + cond.added["text_embeds"].square().mean()).backward()
        first = next(iter(lora.values()))
        assert first.A.grad.abs().max() > 0 and first.B.grad.abs().max() > 0
    # a bare LoRAWeights is the first encoder's; the empty prompt stays zero whatever the LoRA
    assert torch.equal(sdxl.encode_prompts(PROMPTS, lora=loras["text_encoder"]).states, sdxl.encode_prompts(PROMPTS, lora={"text_encoder": loras["text_encoder"]}).states)
    assert sdxl.encode_prompts(["", "a dog"], lora={"text_encoder_2": loras["text_encoder_2"]}).states[0].abs().max() == 0
    torch.testing.assert_close(sdxl.encode_prompts(PROMPTS).states, before.states, rtol=0, atol=0)
    assert all(p.grad is None for c in ("text_encoder", "text_encoder_2") for p in sdxl.components[c].parameters())


def test_lora_convert_round_trip_keeps_kohyas_sdxl_names_without_the_model(sdxl, tmp_path, capsys):
    """``hyperbooth lora convert`` kohya → diffusers → kohya: the header carries the backbone and the UNet's layout,
    so the SGM names come back without loading a model, and so does every ΔW."""
    from hyperbooth.cli import main

    weights = _all_loras(sdxl)
    kohya = save_lora(tmp_path / "k.safetensors", weights, "kohya", models=sdxl.components, backbone="sdxl")
    assert main(["lora", "convert", str(kohya), str(tmp_path / "d.safetensors"), "--format", "diffusers"]) == 0
    assert main(["lora", "convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k2.safetensors"), "--format", "kohya"]) == 0
    with safe_open(str(kohya), "pt") as a, safe_open(str(tmp_path / "k2.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
    again = load_lora(tmp_path / "k2.safetensors", sdxl.components)
    for comp, w in weights.items():
        for name, d in w.deltas().items():
            torch.testing.assert_close(again.components[comp].deltas()[name], d, rtol=1e-5, atol=1e-6)
