"""The page's work without a browser: inputs checked against the limits (each problem named), personalize → images
with captions → a LoRA file that loads, interpolation, world identities with their retrieval rank."""

import pytest
import torch
from PIL import Image

from hyperbooth.cli.ui import load_studio
from hyperbooth.lora.io import load_lora
from hyperbooth.ui import Limits, UIError


@pytest.fixture(scope="module")
def studio(tiny_world_model, world_hypernet, tmp_path_factory):
    return load_studio(tiny_world_model, [world_hypernet], tmp_path_factory.mktemp("ui_out"))


def _photo(path, color=(200, 60, 40), size=(40, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_bad_inputs_are_named(studio, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not an image")
    with pytest.raises(UIError, match=r"^notes.png: not an image file"):
        studio.references([str(fake)])
    with pytest.raises(UIError, match="at most 5"):
        studio.references([_photo(tmp_path / f"{i}.png") for i in range(6)])
    with pytest.raises(UIError, match="upload 1–5 reference images or pick a world identity"):
        studio.references([])
    with pytest.raises(UIError, match="the prompt is empty"):
        studio.prompts("  \n ")
    with pytest.raises(UIError, match="at most 300"):
        studio.prompts("a " * 200)
    refs = studio.references([_photo(tmp_path / "ok.png")])
    weights, _ = studio.personalize(refs, next(iter(studio.personalizers)))
    for kwargs, message in (({"steps": 0}, "steps=0"), ({"steps": 51}, "steps=51"), ({"num_images": 9}, "images per prompt=9"),
                            ({"guidance_scale": float("nan")}, "CFG scale=nan"), ({"seed": -1}, "seed=-1")):
        with pytest.raises(UIError, match=message):
            studio.generate(weights, ["a sks toy"], **kwargs)
    with pytest.raises(UIError, match="unknown method"):
        studio.personalize(refs, "nope")
    small = type(studio)(studio.backbone, studio.personalizers, Limits(max_file_mb=0.0001), out_dir=tmp_path)
    with pytest.raises(UIError, match=r"ok.png is 0.0 MB; at most 0.0001 MB"):
        small.references([str(tmp_path / "ok.png")])


def test_generate_captions_and_a_lora_file_that_loads(studio, tmp_path):
    refs = studio.references([_photo(tmp_path / "a.png"), _photo(tmp_path / "b.png", (30, 200, 90))])
    label = next(iter(studio.personalizers))
    weights, ms = studio.personalize(refs, label)
    seen = []
    gallery = studio.generate(weights, studio.prompts("a sks toy\na sks toy in the snow"), steps=2, num_images=2, seed=5,
                              progress=lambda f, text: seen.append(f))
    assert len(gallery) == 4 and all(isinstance(im, Image.Image) for im, _ in gallery)
    assert gallery[0][1] == "a sks toy — seed 5, HM-CFG 2/2, 2 steps" and "seed 6" in gallery[3][1]
    assert seen[-1] == pytest.approx(1.0) and len(seen) == 4  # one progress report per step of each image
    for layout in ("diffusers", "kohya"):
        path = studio.export(weights, label, layout)
        assert load_lora(path, studio.backbone.components).format == layout
    assert len(studio.save_images(gallery)) == 4


def test_world_identities_show_their_rank_and_interpolation_runs(studio):
    from hyperbooth.world.splits import identity_seeds

    a, b = list(identity_seeds("test", 2))
    refs_a, refs_b = studio.references(None, a), studio.references(None, b)
    label = next(iter(studio.personalizers))
    weights, _ = studio.personalize(refs_a, label)
    gallery = studio.generate(weights, ["a sks ball"], steps=1, identity=a)
    assert "identity rank" in gallery[0][1] and "of 8" in gallery[0][1]
    wa, _ = studio.personalize(refs_a, label)
    start = studio.interpolate(refs_a, refs_b, label, 0.0)
    name = next(iter(wa))
    torch.testing.assert_close(start["unet"][name].delta(), wa[name].delta())
    with pytest.raises(UIError, match="α=1.5"):
        studio.interpolate(refs_a, refs_b, label, 1.5)


def test_the_page_builds_with_world_identities(studio):
    from hyperbooth.ui import build_app
    from hyperbooth.world.splits import identity_seeds

    app = build_app(studio, list(identity_seeds("test", 3)))
    names = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"refs", "identity", "renders", "method", "prompts", "generate", "gallery", "lora", "images"} <= names


def test_loading_another_folder_on_the_page(studio, world_hypernet, tmp_path):
    with pytest.raises(UIError, match="loading folders from the page is off"):  # the default: no roots allowed
        studio.add_folder(str(world_hypernet))
    studio.load_roots = [tmp_path.resolve(), world_hypernet.parent.resolve()]
    try:
        with pytest.raises(UIError, match="is not a hypernetwork folder"):
            studio.add_folder(str(tmp_path))
        with pytest.raises(UIError, match="does not exist"):
            studio.add_folder(str(tmp_path / "missing"))
        with pytest.raises(UIError, match="outside the ones allowed"):
            studio.add_folder("/")
        label = studio.add_folder(str(world_hypernet))
        assert label.startswith("e2e (") and studio.add_folder(str(world_hypernet) + "/") == label  # served once
    finally:
        studio.load_roots = []
