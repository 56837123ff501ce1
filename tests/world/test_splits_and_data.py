import numpy as np
import pytest
import torch

from hyperbooth.errors import ConfigError
from hyperbooth.world import CLASSES, Context, identity_seeds, is_heldout_context, prompt_for, split_of
from hyperbooth.world.contexts import BACKGROUND_NAMES
from hyperbooth.world.datasets import BaseSampleDataset, PersonalizationPairDataset
from hyperbooth.world.identity import COLOR_NAMES, Identity, describe, make_identity


def test_splits_are_disjoint_and_proportioned():
    splits = [split_of(s) for s in range(10_000)]
    share = {name: splits.count(name) / len(splits) for name in ("train", "val", "test")}
    assert 0.87 < share["train"] < 0.93 and 0.035 < share["val"] < 0.065 and 0.035 < share["test"] < 0.065
    train, test = set(identity_seeds("train", 300)), set(identity_seeds("test", 300))
    assert not train & test and all(split_of(s) == "test" for s in test)
    with pytest.raises(ConfigError, match="'dev'"):
        list(identity_seeds("dev", 1))


def test_prompts():
    c = Context(background="snow", recolor="red", accessory="red_hat")
    assert prompt_for("toy", c) == "a red toy wearing a red hat in the snow"
    assert prompt_for("toy", c, token="sks", paraphrase=1) == "a photo of a red sks toy wearing a red hat in the snow"
    assert prompt_for("vase", Context(background="water")) == "a vase floating on top of water"
    with pytest.raises(ConfigError, match="giraffe"):
        prompt_for("giraffe")


def test_described_prompts():
    identity = Identity(seed=1, class_name="ball", shape=(0.0, 0.5, 1.0), primary=(240, 200, 40), secondary=(20, 40, 140), pattern="dots", feature="band")
    assert describe(identity, "none") == ("", "")
    assert describe(identity, "color") == ("yellow", "")
    color, details = describe(identity)
    assert (color, details) == ("yellow", "with navy dots and a navy band")
    assert prompt_for("ball", Context(background="snow"), color=color, details=details) == "a yellow ball with navy dots and a navy band in the snow"
    # a recolour names the new colour instead of the subject's own; the token stays next to the class
    assert prompt_for("ball", Context(recolor="purple"), token="sks", color=color, details=details) == "a purple sks ball with navy dots and a navy band"
    plain = Identity(seed=1, class_name="vase", shape=(0.0, 0.0, 0.0), primary=(40, 40, 45), secondary=(230, 40, 40), pattern="solid", feature="patch")
    assert describe(plain) == ("black", "with a red patch")
    assert describe(Identity(1, "vase", (0.0, 0.0, 0.0), (40, 40, 45), (230, 40, 40), "diagonal", "none")) == ("black", "with red diagonal stripes")
    with pytest.raises(ConfigError, match="'most'"):
        describe(identity, "most")
    # every colour of the world has a word
    assert all(COLOR_NAMES[make_identity(s).secondary] and COLOR_NAMES[make_identity(s).primary] for s in range(300))


def test_base_dataset_describes_some_captions():
    plain = BaseSampleDataset("train", size=200, seed=5)
    described = BaseSampleDataset("train", size=200, seed=5, describe_color=0.25, describe_full=0.5)
    kinds = {"none": 0, "color": 0, "full": 0}
    for i in range(200):
        a, b = plain[i], described[i]
        assert torch.equal(a["image"], b["image"])  # the same subjects and scenes, only the captions differ
        color, details = describe(make_identity(b["identity"]))
        if b["prompt"] == a["prompt"]:
            kinds["none"] += 1
        elif details and details in b["prompt"]:
            kinds["full"] += 1
        else:  # the colour word only (or a subject with nothing more to say, solid and without a feature)
            kinds["color"] += 1
    assert 70 <= kinds["full"] <= 130 and 25 <= kinds["color"] <= 85 and 25 <= kinds["none"] <= 80, kinds
    for bad in ({"describe_color": 1.5}, {"describe_full": -0.1}, {"describe_color": 0.6, "describe_full": 0.6}):
        with pytest.raises(ConfigError, match="describe"):
            BaseSampleDataset("train", size=2, **bad)


def test_heldout_combinations_never_in_train_data():
    heldout = [(c, b) for c in CLASSES for b in BACKGROUND_NAMES[1:] if is_heldout_context(c, Context(background=b))]
    assert len(heldout) == len(CLASSES)
    ds = BaseSampleDataset("train", size=400)
    seen = set()
    for i in range(400):
        labels = ds[i]["labels"]
        seen.add((CLASSES[labels["class"]], BACKGROUND_NAMES[labels["background"]]))
    assert not seen & set(heldout)
    assert len(seen) > 30  # the other combinations do occur


def test_base_dataset_items():
    ds = BaseSampleDataset("val", size=10, resolution=32, seed=3)
    a, b = ds[4], ds[4]
    assert a["image"].shape == (3, 32, 32) and a["image"].dtype == torch.float32
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert torch.equal(a["image"], b["image"]) and a["prompt"] == b["prompt"]
    assert split_of(a["identity"]) == "val"
    assert set(a["labels"]) == {"class", "background", "recolor", "accessory"}
    assert not torch.equal(ds[5]["image"], a["image"])


def test_pair_dataset_modes():
    cross = PersonalizationPairDataset("train", size=5, k=3, mode="cross")
    item = cross[0]
    assert item["references"].shape == (3, 3, 32, 32) and item["target"].shape == (3, 32, 32)
    assert " sks " in item["prompt"]
    assert not torch.equal(item["references"][0], item["target"])
    same = PersonalizationPairDataset("train", size=5, k=2, mode="same")
    item = same[1]
    assert torch.equal(item["references"][0], item["target"])
    with pytest.raises(ConfigError, match="'mixed'"):
        PersonalizationPairDataset(mode="mixed")
    with pytest.raises(ConfigError, match="k"):
        PersonalizationPairDataset(k=0)


def test_prerendered_dataset_serves_the_same_samples():
    from hyperbooth.world.datasets import PrerenderedDataset

    pairs = PersonalizationPairDataset("train", size=20, k=2, mode="cross", seed=3)
    cached = PrerenderedDataset(pairs, range(5, 9), workers=0, progress=False)
    assert len(cached) == len(pairs)
    for i in range(5, 9):
        a, b = pairs[i], cached[i]
        assert torch.equal(a["references"], b["references"]) and torch.equal(a["target"], b["target"])
        assert a["prompt"] == b["prompt"] and a["labels"] == b["labels"]
    with pytest.raises(IndexError, match="4"):
        cached[4]
