"""The README's "diffusers user's path", run verbatim: an SD 1.5 pipeline folder → a hypernetwork → HM-CFG images and a
LoRA file that ``pipe.load_lora_weights`` reads. The folders it names are made here (a tiny SD 1.5 pipeline of SD
1.5's own classes, a tiny e2e hypernetwork for it, two photos) in a temporary working folder."""

import shutil

import numpy as np
import torch
from PIL import Image

from hyperbooth.generate import generate
from hyperbooth.grids import to_uint8
from hyperbooth.lora import load_lora
from hyperbooth.personalize import load_personalizer, personalize

#: The README's snippet, exactly as it stands there.
README_SNIPPET = '''\
from diffusers import StableDiffusionPipeline

from hyperbooth.backbones import load_backbone
from hyperbooth.generate import generate
from hyperbooth.grids import save_png, to_uint8
from hyperbooth.lora import save_lora
from hyperbooth.personalize import load_personalizer, lora_provenance, personalize

backbone = load_backbone("stable-diffusion-v1-5")        # a StableDiffusionPipeline folder (or hub id)
hypernet = load_personalizer("runs/sd15/hypernet")       # a hypernetwork folder of any registered method
weights, ms = personalize(["dog/00.jpg", "dog/01.jpg"], hypernet, backbone)
images = generate(backbone, ["a sks dog in the snow", "a sks dog on the beach"], weights, guidance="hm-cfg", seed=0)
for i, image in enumerate(to_uint8(images)):
    save_png(image, f"dog_{i}.png")
save_lora("dog.safetensors", weights, models=backbone.components, **lora_provenance(hypernet, backbone, "runs/sd15/hypernet"))

pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5")
pipe.load_lora_weights("dog.safetensors")                # diffusers reads the file as it is
'''


def test_readme_shows_this_snippet():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert README_SNIPPET in readme  # the README and this test cannot drift apart


def test_readme_snippet_runs_as_written(sd, tiny_sd, sd_hypernet, ref_pngs, tmp_path, monkeypatch):
    shutil.copytree(tiny_sd, tmp_path / "stable-diffusion-v1-5")
    shutil.copytree(sd_hypernet, tmp_path / "runs" / "sd15" / "hypernet")
    (tmp_path / "dog").mkdir()
    for i, png in enumerate(ref_pngs):
        Image.open(png).save(tmp_path / "dog" / f"{i:02d}.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(README_SNIPPET, "README.md", "exec"), namespace)

    # the images are HM-CFG's for this subject, the same as the library gives, and the subject acted
    refs = [tmp_path / "dog" / f"{i:02d}.jpg" for i in range(len(ref_pngs))]
    weights, _ = personalize(refs, load_personalizer(sd_hypernet), sd)
    prompts = ["a sks dog in the snow", "a sks dog on the beach"]
    expected = to_uint8(generate(sd, prompts, weights, guidance="hm-cfg", seed=0))
    written = np.stack([np.asarray(Image.open(tmp_path / f"dog_{i}.png")) for i in range(2)])
    assert written.shape == (2, 16, 16, 3) and np.abs(written.astype(int) - expected).max() <= 1
    base = to_uint8(generate(sd, prompts, None, guidance="cfg", seed=0))
    assert np.abs(written.astype(int) - base).max() > 10

    # the LoRA file: hyperbooth's header, and diffusers' pipeline with it gives hyperbooth's UNet output
    lora = load_lora(tmp_path / "dog.safetensors", sd.components)
    assert lora.metadata["hyperbooth.method"] == "e2e" and lora.metadata["hyperbooth.hypernet"].startswith("hypernet sha256:")
    pipe = namespace["pipe"]
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(1, *sd.sample_shape, generator=g), torch.tensor([500])
    cond = sd.encode_prompts(prompts[:1])
    with torch.no_grad():
        theirs = pipe.unet(x_t, t, encoder_hidden_states=cond.states).sample
        with sd.apply_lora(namespace["weights"]):
            ours = sd.denoise(x_t, t, cond)
        plain = sd.denoise(x_t, t, cond)
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
