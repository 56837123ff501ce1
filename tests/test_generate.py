import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.lora import LoRAWeights, apply_lora, target_shapes
from hyperbooth.backbones.world import WorldBackbone


@pytest.fixture(scope="module")
def base(tiny_world_model):
    return WorldBackbone.from_pretrained(tiny_world_model)


def _lora(base, n):
    return LoRAWeights.random(target_shapes(base.unet), rank=2, num_subjects=n, std=0.3, generator=torch.Generator().manual_seed(1))


def test_hm_cfg_with_w_pers_zero_is_base_cfg(base):
    prompts = ["a sks toy in the snow", "a sks vase"]
    hm = generate(base, prompts, _lora(base, 2), guidance="hm-cfg", w_base=3.0, w_pers=0.0, steps=3)
    plain = generate(base, prompts, None, guidance_scale=3.0, steps=3)
    torch.testing.assert_close(hm, plain, rtol=1e-4, atol=1e-5)


def test_hm_cfg_timestep_schedule(base):
    from hyperbooth.guidance import check_interval, pers_active
    from hyperbooth.sampling import make_scheduler

    prompts, w = ["a sks toy in the snow", "a sks vase"], _lora(base, 2)
    kw = dict(guidance="hm-cfg", w_base=2.0, w_pers=2.0, steps=4, seed=3)
    always = generate(base, prompts, w, **kw)
    torch.testing.assert_close(generate(base, prompts, w, pers_interval=(0.0, 1.0), **kw), always)
    # which steps run the personalized rows: the noise level t/T of each of the scheduler's timesteps
    sampler = make_scheduler("dpm++", base.scheduler)
    sampler.set_timesteps(4)
    T = sampler.config.num_train_timesteps
    expected = [3 * len(prompts) if pers_active(t, T, (0.5, 1.0)) else 2 * len(prompts) for t in sampler.timesteps]
    assert 0 < expected.count(6) < 4  # the interval splits this schedule
    batches = []
    handle = base.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        half = generate(base, prompts, w, pers_interval=(0.5, 1.0), **kw)
    finally:
        handle.remove()
    assert batches == expected
    assert (half - always).abs().max() > 1e-3
    # an interval no timestep falls in: every step is base CFG with w_base (w_pers = 0)
    assert all(t > 0 for t in sampler.timesteps)
    never = generate(base, prompts, w, pers_interval=(0.0, 0.0), **kw)
    torch.testing.assert_close(never, generate(base, prompts, None, guidance_scale=2.0, steps=4, seed=3), rtol=1e-4, atol=1e-5)
    for bad in ((0.5, 0.2), (-0.1, 1.0), (0.0, float("nan")), (1,)):
        with pytest.raises(ConfigError, match="pers_interval"):
            generate(base, prompts, w, pers_interval=bad, **kw)
    assert check_interval(["0.2", 1]) == (0.2, 1.0)


def test_one_call_branches_equal_separate_calls(base):
    w = _lora(base, 2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    cond = base.encode_prompts(["", "", "a sks toy", "a sks ball", "a sks toy", "a sks ball"])
    states, mask = cond.states, cond.mask
    unet = base.unet
    with apply_lora(unet, w, rows=[-1, -1, -1, -1, 0, 1]):
        one_call = unet(x.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=states, encoder_attention_mask=mask).sample
    base_part = unet(x.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=states[:4], encoder_attention_mask=mask[:4]).sample
    with apply_lora(unet, w):
        pers_part = unet(x, t, encoder_hidden_states=states[4:], encoder_attention_mask=mask[4:]).sample
    torch.testing.assert_close(one_call, torch.cat([base_part, pers_part]), rtol=1e-4, atol=1e-5)


def test_cfg_scale_one_and_lora_effect(base):
    w = _lora(base, 1)
    a = generate(base, ["a sks toy"], w, guidance="cfg", guidance_scale=1.0, steps=2)
    b = generate(base, ["a sks toy"], None, guidance_scale=1.0, steps=2)
    assert (a - b).abs().max() > 1e-3  # the LoRA changes the image
    assert torch.equal(generate(base, ["a sks toy"], w, guidance="cfg", steps=2, seed=5), generate(base, ["a sks toy"], w, guidance="cfg", steps=2, seed=5))


def test_bad_arguments(base):
    with pytest.raises(ConfigError, match="'pag'"):
        generate(base, ["a toy"], guidance="pag")
    with pytest.raises(ConfigError, match="2 subjects"):
        generate(base, ["a toy"], _lora(base, 2))
    with pytest.raises(ConfigError, match="steps"):
        generate(base, ["a toy"], steps=0)


# -- sampler options, subjects, grids ------------------------------------------------------------------------------


def test_one_subject_serves_every_prompt(base):
    w = _lora(base, 1)
    prompts = ["a sks toy", "a sks ball in the snow"]
    for guidance in ("cfg", "hm-cfg"):
        one = generate(base, prompts, w, guidance=guidance, steps=2, seed=3)
        each = generate(base, prompts, w.select([0, 0]), guidance=guidance, steps=2, seed=3)
        torch.testing.assert_close(one, each, rtol=1e-4, atol=1e-4)


def test_callback_seed_and_lora_scale(base):
    w = _lora(base, 1)
    calls = []
    a = generate(base, ["a sks toy"], w, steps=3, seed=7, callback=lambda i, t, x: calls.append((i, tuple(x.shape))))
    assert calls == [(0, (1, 3, 32, 32)), (1, (1, 3, 32, 32)), (2, (1, 3, 32, 32))]
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, generate(base, ["a sks toy"], w, steps=3, seed=7, progress=True))
    assert (a - generate(base, ["a sks toy"], w, steps=3, seed=8)).abs().max() > 1e-2
    zero = generate(base, ["a sks toy"], w, steps=3, seed=7, lora_scale=0.0, w_base=2.0, w_pers=1.0)
    plain = generate(base, ["a sks toy"], None, steps=3, seed=7, guidance_scale=3.0)
    torch.testing.assert_close(zero, plain, rtol=1e-4, atol=1e-5)  # ΔW = 0: HM-CFG is base CFG with w_base + w_pers


def test_unet_dtype_is_followed(base):
    import copy
    import dataclasses

    bf16 = dataclasses.replace(base, unet=copy.deepcopy(base.unet).to(torch.bfloat16))
    w = _lora(base, 1)
    for guidance in ("cfg", "hm-cfg"):
        low = generate(bf16, ["a sks toy"], w, guidance=guidance, steps=2, seed=1)
        full = generate(base, ["a sks toy"], w, guidance=guidance, steps=2, seed=1)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert 0 < (low - full).abs().max() < 0.3  # bf16 rounding, nothing more


def test_parse_mix_and_exact_interpolation(base, tmp_path):
    from hyperbooth.personalize import mix_loras, parse_mix
    from hyperbooth.lora import save_lora

    assert parse_mix(["a.safetensors:0.5", "C:/x/b.safetensors:-1"]) == [(Path("a.safetensors"), 0.5), (Path("C:/x/b.safetensors"), -1.0)]
    for bad in ("a.safetensors", "a.safetensors:half", ":0.5", "a.safetensors:nan"):
        with pytest.raises(ConfigError, match=re.escape(repr(bad))):
            parse_mix([bad])
    a, b = _lora(base, 1), LoRAWeights.random(target_shapes(base.unet), rank=2, std=0.3, generator=torch.Generator().manual_seed(9))
    fa = save_lora(tmp_path / "a.safetensors", a, "kohya", models={"unet": base.unet})
    fb = save_lora(tmp_path / "b.safetensors", b, "diffusers", models={"unet": base.unet})
    mixed = mix_loras([(fa, 0.25), (fb, 0.75)], base.unet)
    assert list(mixed) == ["unet"]
    mixed = mixed["unet"].deltas()
    for name, delta in a.deltas().items():
        torch.testing.assert_close(mixed[name], 0.25 * delta + 0.75 * b.deltas()[name], rtol=1e-5, atol=1e-6)


def test_captioned_grid_layout():
    from hyperbooth.grids import captioned_grid

    cell = np.zeros((8, 8, 3), np.uint8)
    cell[:, :, 0] = 200
    plain = captioned_grid([[cell, cell]], [["", ""]], upscale=4, pad=2)
    assert plain.size == (2 + 2 * (32 + 2), 2 + 32 + 2)
    assert plain.getpixel((2, 2)) == (200, 0, 0) and plain.getpixel((1, 1)) == (255, 255, 255)
    long = "a very long prompt that cannot fit in thirty two pixels of width at all"
    captioned = captioned_grid([[cell, None]], [[long, "seed 1"]], titles=["column one", "two"], upscale=4, pad=2)
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1] + 5 * 10  # wrapped lines
    assert len(set(np.asarray(captioned).reshape(-1, 3).sum(1).tolist())) > 3  # text was drawn


# -- the CLI -------------------------------------------------------------------------------------------------------


def make_tiny_hypernet(unet, folder, seed=0):
    """A tiny e2e hypernetwork saved to ``folder``, with a random (non-zero) head_B so that it has an effect."""
    from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork

    torch.manual_seed(seed)
    hn = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), target_shapes(unet))
    for head in hn.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.5)
    return hn.save_pretrained(folder)


@pytest.fixture(scope="module")
def assets(base, tmp_path_factory):
    """Reference PNGs, a tiny hypernetwork, two LoRA files for the tiny model and one for another model."""
    from PIL import Image

    from hyperbooth.lora import save_lora
    from hyperbooth.grids import to_uint8
    from hyperbooth.world.fidelity import reference_images

    root = tmp_path_factory.mktemp("generate_assets")
    refs = []
    for i, image in enumerate(to_uint8(reference_images(7, 2))):
        Image.fromarray(image).save(root / f"ref{i}.png")
        refs.append(root / f"ref{i}.png")
    g = torch.Generator().manual_seed(2)
    shapes = target_shapes(base.unet)
    loras = [save_lora(root / f"{n}.safetensors", LoRAWeights.random(shapes, rank=2, std=0.3, generator=g), "diffusers", models={"unet": base.unet}) for n in "ab"]
    other = save_lora(root / "other.safetensors", LoRAWeights.random({"mid_block.attentions.0.proj_in": (5, 7)}, rank=1, generator=g), "diffusers")
    return {"refs": refs, "hypernet": make_tiny_hypernet(base.unet, root / "hn"), "loras": loras, "other": other}


def _cli(tiny_world_model, *extra):
    from hyperbooth.cli import main

    return main(["generate", "--model", str(tiny_world_model), "--steps", "2", *map(str, extra)])


def test_cli_images_to_folder_matches_generate(tiny_world_model, base, assets, tmp_path, capsys):
    from PIL import Image

    from hyperbooth.personalize import load_personalizer, personalize
    from hyperbooth.images import load_image
    from hyperbooth.grids import to_uint8

    prompts = ["a sks toy in the snow", "a red sks toy"]
    out = tmp_path / "outs"
    assert _cli(tiny_world_model, "--prompt", *prompts, "--images", *assets["refs"], "--hypernet", assets["hypernet"], "--num-images", 2, "--seed", 4, "--out", f"{out}/") == 0
    assert "2 reference image(s)" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00_a-sks-toy-in-the-snow_seed4.png", "00_a-sks-toy-in-the-snow_seed5.png", "01_a-red-sks-toy_seed4.png", "01_a-red-sks-toy_seed5.png", "grid.png"]
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 4 + 2 * (128 + 4) and grid.size[1] > 4 + 2 * (128 + 4)  # 2 seeds x 2 prompts + captions
    refs = torch.stack([load_image(f, size=32) for f in assets["refs"]])
    weights, _ = personalize(refs, load_personalizer(assets["hypernet"]), base)
    expected = to_uint8(generate(base, prompts, weights, steps=2, seed=5))
    got = np.asarray(Image.open(out / "01_a-red-sks-toy_seed5.png"))
    assert np.abs(got.astype(int) - expected[1]).max() <= 1  # same seed, same image
    plain = to_uint8(generate(base, prompts, None, steps=2, seed=5))
    assert np.abs(got.astype(int) - plain[1]).max() > 10  # and the personalization acted


def test_cli_dtype_and_device_options(tiny_world_model, assets, tmp_path):
    from PIL import Image

    a, _ = assets["loras"]
    assert _cli(tiny_world_model, "--prompt", "a sks ball", "--lora", a, "--device", "cpu", "--dtype", "bfloat16", "--out", tmp_path / "bf16.png") == 0
    assert Image.open(tmp_path / "bf16.png").size == (136, 164)


def test_cli_lora_and_mix_write_one_grid(tiny_world_model, assets, tmp_path):
    from PIL import Image

    a, b = assets["loras"]
    assert _cli(tiny_world_model, "--prompt", "a sks ball", "--lora", a, "--lora-scale", 0.5, "--guidance", "cfg", "--out", tmp_path / "lora.png") == 0
    assert _cli(tiny_world_model, "--prompt", "a sks ball", "--mix", f"{a}:0.5", f"{b}:0.5", "--scheduler", "euler", "--out", tmp_path / "mix.png") == 0
    assert _cli(tiny_world_model, "--prompt", "a sks ball", "--out", tmp_path / "base.png") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.png", "lora.png", "mix.png"]
    images = [np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("lora", "mix", "base")]
    assert images[0].shape == images[1].shape == images[2].shape == (164, 136, 3)  # one cell, two caption lines
    assert np.abs(images[1][4:132, 4:132].astype(int) - images[2][4:132, 4:132]).max() > 10  # the mix acted


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--steps", "0"], "0"),
        (["--scheduler", "lms-fancy"], "'lms-fancy'"),
        (["--guidance", "pag"], "'pag'"),
        (["--num-images", "0"], "0"),
        (["--w-pers", "nan"], "nan"),
        (["--pers-interval", "0.8,0.2"], "0.8,0.2"),
        (["--pers-interval", "half"], "'half'"),
        (["--out", "{tmp}/missing/grid.png"], "missing"),
        (["--out", "{tmp}/missing/deeper/"], "missing"),
        (["--out", "{tmp}/grid.jpg"], "grid.jpg"),
        (["--mix", "{a}"], "a.safetensors"),
        (["--lora", "{other}"], "other.safetensors"),
        (["--lora", "{tmp}/nope.safetensors"], "nope.safetensors"),
        (["--images", "{tmp}/nope.png", "--hypernet", "{hn}"], "nope.png"),
        (["--images", "{ref}", "--hypernet", "{tmp}/no-hn"], "no-hn"),
        (["--device", "warp-drive"], "'warp-drive'"),
    ],
)
def test_cli_bad_input_is_exit_2_naming_the_value(tiny_world_model, assets, tmp_path, capsys, extra, named):
    fill = {"tmp": tmp_path, "a": assets["loras"][0], "other": assets["other"], "hn": assets["hypernet"], "ref": assets["refs"][0]}
    extra = [e.format(**fill) for e in extra]
    args = ["--prompt", "a sks toy", *extra] + ([] if "--out" in extra else ["--out", tmp_path / "grid.png"])
    assert _cli(tiny_world_model, *args) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and err.startswith("hyperbooth generate: error:")
    assert list(tmp_path.rglob("*")) == []  # no partial or stray files


def test_cli_long_prompt_warns(tiny_world_model, tmp_path, caplog):
    long = "a sks toy " + " ".join(["with a very long description"] * 10) + " in the snow"
    assert _cli(tiny_world_model, "--prompt", long, "--steps", 1, "--out", tmp_path / "g.png") == 0
    warned = [r.getMessage() for r in caplog.records if "is dropped" in r.getMessage()]
    assert len(warned) == 1 and "long description" in warned[0] and "'a sks toy with" in warned[0]  # which prompt, what is cut


def test_cli_out_whose_folder_is_a_file_or_cannot_be_written(tiny_world_model, tmp_path, capsys, monkeypatch):
    """Checked before any sampling: a parent that is a file, and a folder where no file can be created."""
    (tmp_path / "notes.txt").write_text("keep me")
    assert _cli(tiny_world_model, "--prompt", "a sks toy", "--out", tmp_path / "notes.txt" / "x.png") == 2
    assert "is not a folder" in capsys.readouterr().err
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr("hyperbooth.generate.generate", no_sampling)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # a read-only folder (chmod does not stop root)
    assert _cli(tiny_world_model, "--prompt", "a sks toy", "--out", tmp_path / "ro.png") == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and "ro.png" in err and "Permission denied" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("existing", [False, True])
def test_cli_folder_output_is_all_or_nothing(tiny_world_model, tmp_path, capsys, monkeypatch, existing):
    """A write failing at the last file (the grid; a full disk here) leaves none of the single images, no temporary
    files, and a folder the command made is removed again; an existing folder keeps what it held."""
    from PIL import Image

    out = tmp_path / "outs"
    if existing:
        out.mkdir()
        (out / "older.png").write_bytes(b"older")
    save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if Path(fp).name.startswith(".grid.png."):
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert _cli(tiny_world_model, "--prompt", "a sks toy", "a red sks toy", "--out", f"{out}/") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "outs" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["older.png", "outs"] if existing else [])
