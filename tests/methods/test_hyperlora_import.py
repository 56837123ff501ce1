"""The released HyperLoRA importer: a synthetic checkpoint in the released key layout (tiny sizes, random tensors),
imported and run against a reference written directly from the released formula; target names against a tiny
SDXL-family UNet and SDXL's own layout; missing / extra / mis-shaped keys, pickles and face encoders refused by
name; save/load; the CLI."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from hyperbooth import methods
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.inject import check_compatible, target_shapes
from hyperbooth.methods.hyperlora_import import ReleasedHyperLoRA, diffusers_module_name, import_released_hyperlora

# SDXL 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), built on the meta device
SDXL = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True)
# the same family, tiny: three levels, the first without attention, two resnets per level
TINY = dict(SDXL, sample_size=8, block_out_channels=[8, 16, 24], transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 2],
            cross_attention_dim=12, addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8, norm_num_groups=4)
# released hyperparameters at tiny sizes: inner attention width (heads x dim_head = 8) differs from dim (16), as released
HP = dict(K=6, rank=4, dim=16, heads=2, dim_head=4, depth=2, ff=2, emb=12, id_dim=10, id_tokens=3)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY).eval()


def _attention_modules(unet):
    """(diffusers name, hidden, cross or None) of every attn1/attn2, in the UNet's order."""
    out = []
    for name, m in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            out.append((name, m.to_q.in_features, m.to_k.in_features if name.endswith("attn2") else None))
    return out


def _released_name(diffusers: str, naming: str) -> str:
    """The name a released json could use for a diffusers module (written independently of the importer's mapping)."""
    if naming == "diffusers":
        return diffusers
    if naming == "kohya":
        return "lora_unet_" + diffusers.replace(".", "_")
    parts = diffusers.split(".")
    rest = "_".join(parts[-3:])  # transformer_blocks_<t>_attn<1|2>
    if parts[0] == "down_blocks":
        block = f"input_blocks_{1 + 3 * int(parts[1]) + int(parts[3])}_1"
    elif parts[0] == "up_blocks":
        block = f"output_blocks_{3 * int(parts[1]) + int(parts[3])}_1"
    else:
        block = "middle_block_1"
    return f"lora_unet_{block}_{rest}"


def write_released(folder, unet, naming="ldm", base=False, dtype=torch.float16, seed=1):
    """A released-layout folder for ``unet`` (modules in reversed order, so that the json's order is what counts)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    hp = HP
    mods = list(reversed(_attention_modules(unet)))
    info = {_released_name(n, naming): {"hidden_size": h, "cross_attention_dim": c} for n, h, c in mods}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hyper_lora_modules.json").write_text(json.dumps(info))

    def resampler(two):
        d, inner = hp["dim"], hp["heads"] * hp["dim_head"]
        t = {"latents": r(1, 8 * len(mods), d), "proj_in.weight": r(d, hp["emb"]), "proj_in.bias": r(d), "proj_out.weight": r(hp["K"], d), "proj_out.bias": r(hp["K"])}
        if two:
            t.update({"proj_in_2.weight": r(d, hp["emb"]), "proj_in_2.bias": r(d)})
        for j in range(hp["depth"]):
            norms = ["norm_attn1", "norm_attn2_l", "norm_attn2_x", "norm_ff"] + (["norm_attn3_l", "norm_attn3_y"] if two else [])
            for n in norms:
                t[f"layers.{j}.{n}.weight"], t[f"layers.{j}.{n}.bias"] = (1 + r(d)), r(d)
            for a in ["attn1", "attn2"] + (["attn3"] if two else []):
                for p in ("to_q", "to_k", "to_v"):
                    t[f"layers.{j}.{a}.{p}.weight"] = r(inner, d)
                t[f"layers.{j}.{a}.to_out.0.weight"] = r(d, inner)
            t[f"layers.{j}.ff.net.0.proj.weight"], t[f"layers.{j}.ff.net.0.proj.bias"] = r(hp["ff"] * d, d), r(hp["ff"] * d)
            t[f"layers.{j}.ff.net.2.weight"], t[f"layers.{j}.ff.net.2.bias"] = r(d, hp["ff"] * d), r(d)
        return t

    save_file(resampler(True), str(folder / "resampler.safetensors"))
    save_file({"0.weight": r(hp["id_tokens"] * hp["emb"], hp["id_dim"]), "0.bias": r(hp["id_tokens"] * hp["emb"]),
               "2.weight": 1 + r(hp["emb"]), "2.bias": r(hp["emb"])}, str(folder / "id_projector.safetensors"))
    bases = {}
    for i, (_, h, c) in enumerate(mods):
        c = c or h
        for p, (d_in, d_out) in zip(("to_q", "to_k", "to_v", "to_out"), ((h, h), (c, h), (c, h), (h, h))):
            bases[f"{i}.{p}.id_down_basis"], bases[f"{i}.{p}.id_up_basis"] = r(hp["K"], d_in, hp["rank"]), r(hp["K"], hp["rank"], d_out)
            if base:
                bases[f"{i}.{p}.base_down_basis"], bases[f"{i}.{p}.base_up_basis"] = r(hp["K"], d_in, hp["rank"] // 2), r(hp["K"], hp["rank"] // 2, d_out)
    save_file(bases, str(folder / "hyper_lora_modules.safetensors"))
    if base:
        save_file(resampler(False), str(folder / "base_resampler.safetensors"))
    return folder, [n for n, _, _ in mods]


# -- the reference: the released formula, written out ----------------------------------------------------------------


def _load(path):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def ref_resampler(sd, x, y):
    """latents ← self-attn, attn to x, attn to y, ff (pre-norm, residual); → proj_out, per batch row."""
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"])  # noqa: E731
    h = HP["heads"]

    def attn(p, q_in, kv):
        q, k, v = q_in @ sd[f"{p}.to_q.weight"].T, kv @ sd[f"{p}.to_k.weight"].T, kv @ sd[f"{p}.to_v.weight"].T
        split = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (w @ v).transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1) @ sd[f"{p}.to_out.0.weight"].T

    lat = sd["latents"].expand((x if x is not None else y).shape[0], -1, -1)
    x = None if x is None else x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    y = None if y is None else y @ sd["proj_in_2.weight"].T + sd["proj_in_2.bias"]
    for j in range(HP["depth"]):
        p = f"layers.{j}"
        n = ln(lat, f"{p}.norm_attn1")
        lat = lat + attn(f"{p}.attn1", n, n)
        if x is not None:
            lat = lat + attn(f"{p}.attn2", ln(lat, f"{p}.norm_attn2_l"), ln(x, f"{p}.norm_attn2_x"))
        if y is not None:
            lat = lat + attn(f"{p}.attn3", ln(lat, f"{p}.norm_attn3_l"), ln(y, f"{p}.norm_attn3_y"))
        h1 = ln(lat, f"{p}.norm_ff") @ sd[f"{p}.ff.net.0.proj.weight"].T + sd[f"{p}.ff.net.0.proj.bias"]
        lat = lat + F.gelu(h1) @ sd[f"{p}.ff.net.2.weight"].T + sd[f"{p}.ff.net.2.bias"]
    return lat @ sd["proj_out.weight"].T + sd["proj_out.bias"]


def ref_delta(folder, tokens, arcface, module_index, proj_index):
    """ΔW of one projection of one module for one subject (``tokens (k, T, E)``, ``arcface (k, 512) | None``)."""
    res, idp, bases = _load(folder / "resampler.safetensors"), _load(folder / "id_projector.safetensors"), _load(folder / "hyper_lora_modules.safetensors")
    ids = None
    if arcface is not None:
        ids = (arcface @ idp["0.weight"].T + idp["0.bias"]).view(arcface.shape[0], HP["id_tokens"], HP["emb"])
        ids = F.layer_norm(ids, (HP["emb"],), idp["2.weight"], idp["2.bias"])
    o = ref_resampler(res, ids, tokens).mean(dim=0)  # the mean over references ...
    c = o / torch.sqrt((o**2).sum(-1, keepdim=True) + 1e-8)  # ... then the normalisation
    p = ("to_q", "to_k", "to_v", "to_out")[proj_index]
    c_down, c_up = c[8 * module_index + 2 * proj_index], c[8 * module_index + 2 * proj_index + 1]
    down = torch.einsum("k,kir->ir", c_down, bases[f"{module_index}.{p}.id_down_basis"]).T  # (r, d_in)
    up = torch.einsum("k,kro->ro", c_up, bases[f"{module_index}.{p}.id_up_basis"]).T  # (d_out, r)
    return (HP["rank"] / 2) / HP["rank"] * up @ down  # alpha = r / 2


# -- tests -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["ldm", "kohya", "diffusers"])
def test_import_targets_are_the_unets_attention_projections_in_the_jsons_order(tmp_path, unet, naming):
    folder, order = write_released(tmp_path / "rel", unet, naming=naming)
    model = import_released_hyperlora(folder, unet=unet, heads=HP["heads"])
    assert model.target_shapes == target_shapes(unet)  # every to_q/to_k/to_v/to_out.0, shapes equal
    assert model.names[::4] == [f"{n}.to_q" for n in order]  # latents and bases follow the json
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.dim_head, cfg.num_basis, cfg.rank, cfg.num_id_tokens, cfg.id_embed_dim, cfg.id_path, cfg.base_lora) == \
        (HP["dim"], HP["depth"], HP["dim_head"], HP["K"], HP["rank"], HP["id_tokens"], HP["id_dim"], True, False)
    assert model.resampler.latents.dtype == torch.float32


def test_sdxl_ldm_module_names_of_the_released_layout_map_onto_sdxls_unet():
    """The released SDXL module list (ComfyUI-HyperLoRA hyperlora/common.py: input blocks 4, 5 with 2 transformer
    blocks, 7, 8 with 10; middle 10; output 0-2 with 10, 3-5 with 2) in LDM naming → exactly SDXL's 140 attention
    modules; their 560 projections are SDXL's LoRA targets."""
    ids = [(4, 2), (5, 2), (7, 10), (8, 10)], [(0, 10)], [(0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)]
    names = [f"lora_unet_input_blocks_{b}_1_transformer_blocks_{t}_{a}" for b, n in ids[0] for t in range(n) for a in ("attn1", "attn2")]
    names += [f"lora_unet_middle_block_1_transformer_blocks_{t}_{a}" for _, n in ids[1] for t in range(n) for a in ("attn1", "attn2")]
    names += [f"lora_unet_output_blocks_{b}_1_transformer_blocks_{t}_{a}" for b, n in ids[2] for t in range(n) for a in ("attn1", "attn2")]
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**SDXL)
    shapes = target_shapes(sdxl)
    mapped = {diffusers_module_name(n) for n in names}
    assert len(names) == 140 and mapped == {t.rsplit(".", 1)[0] if not t.endswith("to_out.0") else t[:-len(".to_out.0")] for t in shapes}
    assert len(shapes) == 560 and set(shapes.values()) == {(640, 640), (2048, 640), (1280, 1280), (2048, 1280)}
    with pytest.raises(CheckpointError, match="input block 3 holds no attention"):
        diffusers_module_name("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1")


def test_output_equals_the_released_formula_with_and_without_the_id_path(tmp_path, unet, caplog):
    folder, order = write_released(tmp_path / "rel", unet)
    model = import_released_hyperlora(folder, heads=HP["heads"])
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 3, 7, HP["emb"], generator=g)  # one subject, three references, 7 tokens
    arcface = F.normalize(torch.randn(1, 3, HP["id_dim"], generator=g), dim=-1)
    with torch.no_grad():
        full = model.weights(model.coefficients_from_tokens(tokens, arcface))
        with caplog.at_level(logging.WARNING):
            no_id = model.weights(model.coefficients_from_tokens(tokens))
    assert "ID path is skipped" in caplog.text and "dlib" in caplog.text
    for module_index, proj_index in [(0, 0), (1, 2), (len(order) - 1, 3), (4, 1)]:
        name = model.names[4 * module_index + proj_index]
        torch.testing.assert_close(full[name].delta()[0], ref_delta(folder, tokens[0], arcface[0], module_index, proj_index), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(no_id[name].delta()[0], ref_delta(folder, tokens[0], None, module_index, proj_index), atol=1e-5, rtol=1e-4)
    assert set(full.ranks.values()) == {HP["rank"]} and {l.alpha for l in full.values()} == {HP["rank"] / 2}
    with pytest.raises(ConfigError, match="id_embeds must be"):
        model.coefficients_from_tokens(tokens, arcface[:, :2])


def test_personalize_from_images_through_the_clip_encoders_penultimate_state(tmp_path, unet):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=HP["emb"], intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(clip)
    folder, _ = write_released(tmp_path / "rel", unet)
    model = import_released_hyperlora(folder, image_encoder=clip, heads=HP["heads"])
    refs = torch.rand(1, 2, 3, 32, 32) * 2 - 1
    arcface = F.normalize(torch.randn(1, 2, HP["id_dim"]), dim=-1)
    with torch.no_grad():
        tokens = model.encoder(refs[0])
        x = ((refs[0] + 1) / 2 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        want = CLIPVisionModel.from_pretrained(clip)(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tokens, want, atol=1e-4, rtol=1e-4)
        weights = model(refs, id_embeds=arcface)
        direct = model.weights(model.coefficients_from_tokens(tokens[None], arcface))
    check_compatible(unet, weights)  # every target exists in the UNet with its shape
    for name in model.names[:8]:
        torch.testing.assert_close(weights[name].delta(), direct[name].delta())
    with pytest.raises(ConfigError, match="no image encoder"):
        import_released_hyperlora(folder, heads=HP["heads"])(refs)


def test_save_and_load_give_the_same_loras(tmp_path, unet):
    folder, _ = write_released(tmp_path / "rel", unet, base=True)
    model = import_released_hyperlora(folder, heads=HP["heads"])
    assert model.config.base_lora and model.config.rank // 2 == model.hyper_lora_modules[0].to_q.base_down_basis.shape[-1]
    model.save_pretrained(tmp_path / "hb", dtype=torch.float16)  # the released files are float16: nothing is lost
    again = methods.load(tmp_path / "hb")
    assert isinstance(again, ReleasedHyperLoRA) and again.names == model.names
    tokens = torch.randn(2, 1, 5, HP["emb"])
    arcface = F.normalize(torch.randn(2, 1, HP["id_dim"]), dim=-1)
    with torch.no_grad():
        a = model.coefficients_from_tokens(tokens, arcface, base_tokens=tokens)
        b = again.coefficients_from_tokens(tokens, arcface, base_tokens=tokens)
        wa, wb = model.weights(a), again.weights(b)
    assert set(a) == {"id", "base"}
    assert set(wa.ranks.values()) == {HP["rank"] + HP["rank"] // 2}
    for name in model.names[:8]:
        torch.testing.assert_close(wa[name].delta(), wb[name].delta())
    ident, base = model.id_lora(a), model.base_lora(a)
    name = model.names[5]
    torch.testing.assert_close(wa[name].delta(), ident[name].delta() + 0.25 * base[name].delta())


def _rewrite(path, change):
    tensors = _load(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_missing_extra_and_misshaped_keys_are_named(tmp_path, unet):
    folder, _ = write_released(tmp_path / "a", unet)
    _rewrite(folder / "resampler.safetensors", lambda t: t.pop("layers.1.attn3.to_v.weight"))
    with pytest.raises(CheckpointError, match=r"resampler.safetensors: key 'layers.1.attn3.to_v.weight' is missing"):
        import_released_hyperlora(folder, heads=HP["heads"])

    folder, _ = write_released(tmp_path / "b", unet)
    _rewrite(folder / "id_projector.safetensors", lambda t: t.update({"3.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"id_projector.safetensors: unexpected key '3.weight'"):
        import_released_hyperlora(folder, heads=HP["heads"])

    folder, _ = write_released(tmp_path / "c", unet)
    _rewrite(folder / "hyper_lora_modules.safetensors", lambda t: t.update({"2.to_k.id_up_basis": torch.zeros(HP["K"], HP["rank"], 5)}))
    with pytest.raises(CheckpointError, match=r"key '2.to_k.id_up_basis' has shape \(6, 4, 5\), expected \(6, 4, \d+\)"):
        import_released_hyperlora(folder, heads=HP["heads"])

    folder, _ = write_released(tmp_path / "d", unet)
    with pytest.raises(CheckpointError, match="not a multiple of heads=3"):
        import_released_hyperlora(folder, heads=3)
    info = json.loads((folder / "hyper_lora_modules.json").read_text())
    first = next(iter(info))
    info[first] = {"hidden_size": "wide"}
    (folder / "hyper_lora_modules.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=f"entry '{first}' must be"):
        import_released_hyperlora(folder, heads=HP["heads"])


def test_targets_are_checked_against_another_unet(tmp_path, unet):
    folder, _ = write_released(tmp_path / "rel", unet)
    other = UNet2DConditionModel(**dict(TINY, cross_attention_dim=20)).eval()
    with pytest.raises(CheckpointError, match=r"attn2.to_k' is \(d_in, d_out\) = \(12, \d+\) in the HyperLoRA but \(20, \d+\) in the UNet"):
        import_released_hyperlora(folder, unet=other, heads=HP["heads"])


def test_pickles_are_refused(tmp_path, unet):
    folder, _ = write_released(tmp_path / "rel", unet)
    with pytest.raises(CheckpointError, match="pickle"):
        import_released_hyperlora(folder / "resampler.bin")
    (folder / "resampler.safetensors").unlink()
    (folder / "resampler.pt").write_bytes(b"PK\x03\x04 not read")
    with pytest.raises(CheckpointError, match=r"resampler.safetensors: no such file \(there is resampler.pt: a pickle"):
        import_released_hyperlora(folder)
    (folder / "resampler.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a torch.save zip under the right name
    with pytest.raises(CheckpointError, match="pickle"):
        import_released_hyperlora(folder)


def test_face_encoders_dlib_refused_insightface_needs_installing(tmp_path, unet):
    folder, _ = write_released(tmp_path / "rel", unet)
    with pytest.raises(ConfigError, match="dlib's 128-d face descriptor cannot stand in for the 512-d ArcFace"):
        import_released_hyperlora(folder, heads=HP["heads"], face_encoder="dlib")
    try:
        import insightface  # noqa: F401
    except ImportError:  # not installed here: asked for, it is named
        model = import_released_hyperlora(folder, heads=HP["heads"], face_encoder="insightface")
        with pytest.raises(ConfigError, match="needs the insightface package"):
            model._face_encoder()


def test_a_released_folder_given_as_a_hypernet_says_how_to_convert_it(tmp_path, unet):
    folder, _ = write_released(tmp_path / "rel", unet)
    with pytest.raises(CheckpointError, match="hyperbooth import-hyperlora"):
        methods.load(folder)


def test_cli_writes_a_personalizer_folder(tmp_path, unet, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from hyperbooth.cli import main

    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=HP["emb"], intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(clip)
    folder, _ = write_released(tmp_path / "rel", unet)
    out = tmp_path / "hb"
    assert main(["import-hyperlora", str(folder), "--image-encoder", str(clip), "--out", str(out), "--heads", str(HP["heads"])]) == 0
    assert "ID path skipped" in capsys.readouterr().out
    model = methods.load(out)
    assert model.method == "hyperlora-released" and model.config.encoder == str(clip.resolve())
    assert json.loads((out / "hypernet_config.json").read_text())["imported_from"] == str(folder.resolve())
    with torch.no_grad():
        weights = model(torch.rand(1, 1, 3, 32, 32) * 2 - 1)
    check_compatible(unet, weights)
    assert main(["import-hyperlora", str(folder), "--image-encoder", str(clip), "--out", str(out), "--face-encoder", "dlib"]) == 2


def test_personalize_cli_with_the_imported_folder_on_a_tiny_sdxl(tmp_path):
    """import-hyperlora, then `personalize --hypernet` on an SDXL backbone (where this version has one): a kohya LoRA file
    of every attention projection, rank r, alpha r / 2."""
    tiny = pytest.importorskip("hyperbooth.tiny")
    if not hasattr(tiny, "tiny_sdxl_pipeline"):
        pytest.skip("no tiny SDXL pipeline in this version")
    import numpy as np
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from hyperbooth.backbones import load_backbone
    from hyperbooth.cli import main
    from hyperbooth.lora.io import load_lora

    sdxl = tiny.tiny_sdxl_pipeline(tmp_path / "sdxl")
    backbone = load_backbone(str(sdxl))
    folder, _ = write_released(tmp_path / "rel", backbone.unet)
    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=HP["emb"], intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(clip)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / "face.png")
    out = tmp_path / "face.safetensors"
    assert main(["import-hyperlora", str(folder), "--image-encoder", str(clip), "--out", str(tmp_path / "hb"), "--heads", str(HP["heads"]), "--model", str(sdxl)]) == 0
    assert main(["personalize", "--hypernet", str(tmp_path / "hb"), "--model", str(sdxl), "--images", str(tmp_path / "face.png"), "--out", str(out), "--format", "kohya"]) == 0
    lora = load_lora(out, models=backbone.components)
    assert set(lora.components["unet"]) == set(backbone.target_shapes())
    assert {l.rank for l in lora.components["unet"].values()} == {HP["rank"]} and {l.alpha for l in lora.components["unet"].values()} == {HP["rank"] / 2}
