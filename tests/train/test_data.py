"""Training datasets: the world's pairs, DreamBench's folder-per-subject layout and flat photo folders."""

from dataclasses import dataclass, field

import pytest
import torch

from hyperbooth.config import load_config
from hyperbooth.errors import ConfigError, ImageLoadError
from hyperbooth.images import load_image
from hyperbooth.train.data import DataConfig, PhotoFolderDataset, SubjectFolderDataset, batches, build_dataset
from hyperbooth.world.contexts import CLASSES

from .conftest import DREAMBENCH, write_photo


@dataclass
class _Holder:  # the "data" section as a training config holds it (errors name data.<key>)
    data: DataConfig = field(default_factory=DataConfig)


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["references"], b["references"]) and torch.equal(a["target"], b["target"]) and a["prompt"] == b["prompt"]


def test_subject_folders_give_k_references_another_target_and_the_class_prompt(subject_folder):
    cfg = DataConfig(kind="dreambench", path=str(subject_folder), k=2, classes_file=str(subject_folder.parent / "classes.txt"))
    ds = build_dataset(cfg, resolution=16, size=40)
    assert isinstance(ds, SubjectFolderDataset) and len(ds) == 40
    items = [ds[i] for i in range(40)]
    assert {(i["prompt"], i["class_name"]) for i in items} == {("a sks toy", "toy"), ("a sks cup", "cup")}
    item = items[3]
    assert item["references"].shape == (2, 3, 16, 16) and item["target"].shape == (3, 16, 16)
    assert -1.0 <= item["references"].min() and item["references"].max() <= 1.0
    assert not any(torch.equal(item["target"], r) for r in item["references"])  # cross: another photo of the subject
    assert _same(ds[3], item) and _same(build_dataset(cfg, 16, 40)[3], item)  # a function of (seed, index)
    other_seed = build_dataset(DataConfig(**{**cfg.__dict__, "seed": 1}), 16, 40)
    assert not all(_same(other_seed[i], items[i]) for i in range(10))

    same = build_dataset(DataConfig(kind="dreambench", path=str(subject_folder), k=3, mode="same"), 16, 4)[0]
    assert torch.equal(same["target"], same["references"][0])
    assert same["class_name"] in ("red toy", "blue cup")  # no table: the folder's name
    named = build_dataset(DataConfig(kind="dreambench", path=str(subject_folder), class_name="thing", subjects=("blue_cup",)), 16, 4)
    assert {named[i]["prompt"] for i in range(4)} == {"a sks thing"}


def test_dreambench_photos_with_their_class_table():
    """Two subjects of the real DreamBench folder, classes read from its prompts_and_classes.txt."""
    cfg = DataConfig(kind="dreambench", path=str(DREAMBENCH), subjects=("backpack_dog", "dog"), k=2,
                     classes_file=str(DREAMBENCH / "prompts_and_classes.txt"))
    ds = build_dataset(cfg, resolution=32, size=20)
    assert ds.names == ["backpack_dog", "dog"] and ds.classes == ["backpack", "dog"]
    prompts = {ds[i]["prompt"] for i in range(20)}
    assert prompts == {"a sks backpack", "a sks dog"}
    # photos are served exactly as load_image reads them (the uint8 cache loses nothing)
    photos = [load_image(f, size=32) for f in sorted((DREAMBENCH / "dog").glob("*.jpg"))]
    item = next(ds[i] for i in range(20) if ds[i]["class_name"] == "dog")
    assert any(torch.equal(item["target"], p) for p in photos)


def test_flat_folder_captions_flips_and_epochs(tmp_path):
    for i in range(3):
        write_photo(tmp_path / "faces" / f"face{i}.png", (200, 150, 120), shift=i)
    (tmp_path / "faces" / "face1.txt").write_text("a photo of a  smiling woman\n")
    (tmp_path / "faces" / "notes.md").write_text("not a photo")
    cfg = DataConfig(kind="folder", path=str(tmp_path / "faces"), class_name="person")
    ds = build_dataset(cfg, resolution=16, size=9)
    assert isinstance(ds, PhotoFolderDataset)
    assert sorted(ds.prompts) == ["a photo of a smiling woman", "a sks person", "a sks person"]
    for epoch in range(3):  # each photo once per epoch
        firsts = [ds[3 * epoch + j]["references"][0] for j in range(3)]
        assert all(sum(torch.equal(f, g) for g in firsts) == 1 for f in firsts)
    item = ds[4]
    assert item["references"].shape == (1, 3, 16, 16) and torch.equal(item["target"], item["references"][0])  # flip_p = 0
    flipped = build_dataset(DataConfig(**{**cfg.__dict__, "flip_p": 1.0}), 16, 9)[4]
    assert torch.equal(flipped["target"], item["references"][0].flip(-1)) and torch.equal(flipped["references"], item["references"])
    lazy = build_dataset(DataConfig(**{**cfg.__dict__, "preload": False}), 16, 9)
    assert lazy.photos.cache is None and all(_same(lazy[i], ds[i]) for i in range(9))


def test_world_pairs_carry_their_class_and_batches_collate():
    cfg = DataConfig(kind="world", k=2, num_workers=0)
    ds = build_dataset(cfg, resolution=32, size=8)
    assert ds[0]["class_name"] in CLASSES and ds[0]["references"].shape == (2, 3, 32, 32)
    first = next(batches(ds, [4, 5, 6], 3, cfg, progress=False))  # prerendered
    assert first["references"].shape == (3, 2, 3, 32, 32) and first["index"].tolist() == [4, 5, 6]
    live = next(batches(ds, [4, 5, 6], 3, DataConfig(kind="world", k=2, num_workers=0, prerender=False), progress=False))
    assert torch.equal(live["target"], first["target"]) and live["prompt"] == first["prompt"] == [ds[i]["prompt"] for i in (4, 5, 6)]
    assert live["class_name"] == [ds[i]["class_name"] for i in (4, 5, 6)]


def test_bad_data_is_named(subject_folder, tmp_path):
    def build(**kw):
        return build_dataset(DataConfig(**kw), 16, 4)

    bad = subject_folder / "red_toy" / "03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError, match="03.png"):
        build(kind="dreambench", path=str(subject_folder))
    bad.unlink()
    with pytest.raises(ImageLoadError, match=r"blue_cup holds 3 photo\(s\); data.k=3 with data.mode=cross needs 4"):
        build(kind="dreambench", path=str(subject_folder), k=3)
    table = tmp_path / "classes.txt"
    table.write_text(table.read_text().replace("blue_cup,cup\n", ""))
    with pytest.raises(ConfigError, match="'blue_cup' is not in the class table"):
        build(kind="dreambench", path=str(subject_folder), classes_file=str(table))
    with pytest.raises(ConfigError, match="data.subjects: 'green_hat' is not a subject folder"):
        build(kind="dreambench", path=str(subject_folder), subjects=("green_hat",))
    with pytest.raises(ConfigError, match="is not a folder"):
        build(kind="dreambench", path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"00.png has no caption \(00.txt\) and data.class_name is not set"):
        build(kind="folder", path=str(subject_folder / "red_toy"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="holds no images"):
        build(kind="folder", path=str(tmp_path / "empty"), class_name="x")
    for overrides, match in ((["data.kind=video"], "data.kind='video'"), (["data.kind=folder"], "data.path must name"),
                             (["data.kind=folder", "data.path=x", "data.k=2"], "data.k=2: a flat folder"),
                             (["data.flip_p=2"], "data.flip_p=2"), (["data.token=two words"], "data.token")):
        with pytest.raises(ConfigError, match=match):
            load_config(_Holder, None, overrides)
