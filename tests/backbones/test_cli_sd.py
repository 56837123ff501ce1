"""`hyperbooth generate` and `hyperbooth personalize` on a Stable Diffusion 1.5 pipeline folder (a tiny one of SD 1.5's
own classes) with an e2e hypernetwork built for it, and their refusals of bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from hyperbooth.cli import main
from hyperbooth.generate import generate
from hyperbooth.grids import to_uint8
from hyperbooth.lora import DEFAULT_TEXT_ENCODER_TARGETS, LoRAWeights, load_lora, save_lora, target_shapes
from hyperbooth.methods import SHIPPED_E2E
from hyperbooth.personalize import load_personalizer, mix_loras, personalize

PROMPTS = ["a sks dog in the snow", "a red sks dog"]


@pytest.fixture(scope="module")
def lora_file(sd, tmp_path_factory) -> Path:
    weights = LoRAWeights.random(sd.target_shapes(), rank=2, std=0.2, generator=torch.Generator().manual_seed(3))
    return save_lora(tmp_path_factory.mktemp("sd_lora") / "subject.safetensors", weights, "kohya", models=sd.components)


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


@pytest.mark.parametrize("guidance", ["hm-cfg", "cfg"])
def test_generate_with_a_lora_file(sd, tiny_sd, lora_file, tmp_path, guidance):
    out = tmp_path / "outs"
    args = ["generate", "--model", tiny_sd, "--lora", lora_file, "--guidance", guidance, "--prompt", *PROMPTS, "--steps", 2, "--seed", 1, "--out", f"{out}/"]
    assert main(list(map(str, args))) == 0
    got = _images(out)
    assert sorted(got) == ["00_a-sks-dog-in-the-snow_seed1.png", "01_a-red-sks-dog_seed1.png"] and (out / "grid.png").is_file()
    expected = to_uint8(generate(sd, PROMPTS, load_lora(lora_file, sd.components).components, guidance=guidance, steps=2, seed=1))
    assert np.abs(got["01_a-red-sks-dog_seed1.png"] - expected[1]).max() <= 1
    plain = to_uint8(generate(sd, PROMPTS, None, guidance="cfg", steps=2, seed=1))
    assert np.abs(got["01_a-red-sks-dog_seed1.png"] - plain[1]).max() > 10  # the LoRA acted


def test_generate_with_images_and_a_hypernetwork(sd, tiny_sd, sd_hypernet, ref_pngs, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = ["generate", "--model", tiny_sd, "--images", *ref_pngs, "--hypernet", sd_hypernet, "--guidance", "hm-cfg",
            "--prompt", PROMPTS[0], "--steps", 2, "--out", out]
    assert main(list(map(str, args))) == 0
    assert "2 reference image(s), e2e" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    weights, _ = personalize(ref_pngs, load_personalizer(sd_hypernet), sd)
    expected = to_uint8(generate(sd, PROMPTS[:1], weights, guidance="hm-cfg", steps=2, seed=0))[0]
    cell = grid[4 : 4 + 128 : 8, 4 : 4 + 128 : 8]  # the grid upscales the 16x16 image 8x (nearest), after a 4-pixel pad
    assert np.abs(cell.astype(int) - expected).max() <= 1


def test_personalize_writes_a_file_that_diffusers_loads(sd, tiny_sd, sd_hypernet, ref_pngs, tmp_path, capsys):
    """The file written by `personalize` loads with ``StableDiffusionPipeline.load_lora_weights`` and gives the UNet
    output of hyperbooth's own injection of the same subject; its header records the method and the hypernetwork."""
    out = tmp_path / "s.safetensors"
    args = ["personalize", "--model", tiny_sd, "--hypernet", sd_hypernet, "--images", *ref_pngs, "--out", out]
    assert main(list(map(str, args))) == 0
    assert "e2e" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        header = f.metadata()
    assert header["hyperbooth.method"] == "e2e" and header["hyperbooth.backbone"] == "sd15"
    assert header["hyperbooth.hypernet"].startswith(f"{sd_hypernet.name} sha256:") and header["hyperbooth.base_model"] == tiny_sd.name
    assert set(json.loads(header["hyperbooth.targets"])) == {"unet"}

    weights, _ = personalize(ref_pngs, load_personalizer(sd_hypernet), sd)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, *sd.sample_shape, generator=g), torch.tensor([700, 700])
    cond = sd.encode_prompts(PROMPTS)
    with torch.no_grad():
        plain = sd.denoise(x_t, t, cond)
        with sd.apply_lora(weights, mode="per_sample"):
            ours = sd.denoise(x_t, t, cond)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        theirs = pipe.unet(x_t, t, encoder_hidden_states=cond.states).sample
    assert (ours - plain).abs().max() > 1e-2  # the hypernetwork's LoRA acts
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def unknown_method(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_hn") / "nope-hypernet"
    folder.mkdir()
    (folder / "hypernet_config.json").write_text(json.dumps({"method": "nope", "config": {}}))
    return folder


@pytest.fixture(scope="module")
def neither(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("neither") / "photos"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("command", ["generate", "personalize"])
@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("unknown method", ["nope-hypernet", "'nope'", "not a registered method"]),
        ("world hypernetwork", [str(SHIPPED_E2E), "built for another backbone", "first target that differs: 'down_blocks."]),
        ("model is neither", ["photos", "no model_index.json"]),
    ],
)
def test_bad_input_is_exit_2_naming_it_and_nothing_written(tiny_sd, ref_pngs, unknown_method, neither, tmp_path, capsys, command, case, named):
    hypernet = {"unknown method": unknown_method, "world hypernetwork": SHIPPED_E2E}.get(case, None)
    model = neither if case == "model is neither" else tiny_sd
    args = [command, "--model", model, "--images", *ref_pngs]
    args += ["--hypernet", hypernet] if hypernet else []
    args += ["--out", tmp_path / ("s.safetensors" if command == "personalize" else "x.png")]
    args += ["--prompt", "a sks dog", "--steps", 1] if command == "generate" else []
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hyperbooth {command}: error:") and "\n" not in err
    for part in named:
        assert part in err, (part, err)
    assert list(tmp_path.iterdir()) == []


def test_hm_cfg_without_a_subject_is_refused_on_sd(tiny_sd, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_sd), "--guidance", "hm-cfg", "--prompt", "a dog", "--out", str(tmp_path / "x.png")]) == 2
    assert "--guidance hm-cfg needs a subject" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_sd), "--hypernet", str(tmp_path), "--prompt", "a dog", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs --images" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_mix_keeps_every_component_and_refuses_files_that_differ(sd, tiny_sd, tmp_path, capsys):
    """``--mix`` of SD files with a text-encoder part mixes both components (exactly, in ΔW space); a file without
    one is refused by name rather than mixed with the text-encoder part dropped."""
    g = torch.Generator().manual_seed(4)
    te_shapes = target_shapes(sd.text_encoder, DEFAULT_TEXT_ENCODER_TARGETS)
    parts = [{"unet": LoRAWeights.random(sd.target_shapes(), rank=2, std=0.2, generator=g),
              "text_encoder": LoRAWeights.random(te_shapes, rank=2, std=0.2, generator=g)} for _ in range(2)]
    files = [save_lora(tmp_path / f"{i}.safetensors", p, "diffusers", models=sd.components) for i, p in enumerate(parts)]
    mixed = mix_loras([(files[0], 0.5), (files[1], -1.0)], sd.components)
    assert set(mixed) == {"unet", "text_encoder"}
    for comp in mixed:
        for name, delta in mixed[comp].deltas().items():
            torch.testing.assert_close(delta, 0.5 * parts[0][comp].deltas()[name] - parts[1][comp].deltas()[name], rtol=1e-5, atol=1e-6)
    unet_only = save_lora(tmp_path / "unet_only.safetensors", parts[0]["unet"], "diffusers", models=sd.components)
    out = tmp_path / "outs"
    out.mkdir()
    args = ["generate", "--model", tiny_sd, "--prompt", "a sks dog", "--steps", 1, "--mix", f"{files[0]}:0.5", f"{unet_only}:0.5", "--out", out / "x.png"]
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert "unet_only.safetensors holds components ['unet']" in err and "cannot be mixed" in err
    assert list(out.iterdir()) == []
    args[args.index(f"{unet_only}:0.5")] = f"{files[1]}:0.5"
    assert main(list(map(str, args))) == 0 and (out / "x.png").is_file()
