"""The models shipped inside the package load with diffusers' own loaders and do what the README says."""

import json
import shutil

import pytest
import torch

from hyperbooth.errors import CheckpointError
from hyperbooth.world.base_model import SHIPPED_BASE_MODEL, WorldBaseModel
from hyperbooth.world.oracles import SHIPPED_ORACLES, Oracles


def test_shipped_base_model_loads_with_diffusers_loaders():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(SHIPPED_BASE_MODEL, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(SHIPPED_BASE_MODEL, subfolder="scheduler")
    assert unet.config.cross_attention_dim == 384 and scheduler.config.prediction_type == "v_prediction"
    index = json.loads((SHIPPED_BASE_MODEL / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    size_mb = sum(f.stat().st_size for f in SHIPPED_BASE_MODEL.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 40


def test_shipped_base_model_generates(tmp_path):
    model = WorldBaseModel.from_pretrained()
    images = model.generate(["a toy in the snow", "a red ball on the beach"], steps=4, seed=1)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.std() > 0.1  # not a flat image


def test_damaged_base_model_names_the_folder_and_the_fix(tmp_path):
    broken = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE_MODEL, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"base.*damaged.*train-base --config configs/world_base.yaml"):
        WorldBaseModel.from_pretrained(broken)
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks unet/config.json"):
        WorldBaseModel.from_pretrained(broken)


def test_shipped_oracles_load_and_separate_identities():
    from hyperbooth.world.oracles import evaluate_oracles

    oracles = Oracles.load()
    figures = evaluate_oracles(oracles.identity, oracles.context, n=100)
    assert figures["identity_roc_auc"] > 0.95
    assert figures["background_accuracy"] > 0.9
    assert (SHIPPED_ORACLES / "oracles.json").is_file()
