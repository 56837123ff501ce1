"""``load_backbone``: the class from ``model_index.json``, and one clear error naming the folder for everything else."""

import json
import re
import shutil

import huggingface_hub.constants
import pytest
import torch

from hyperbooth.backbones import BACKBONES, StableDiffusionBackbone, WorldBackbone, backbone_class, load_backbone
from hyperbooth.errors import CheckpointError


def test_picks_the_class_from_model_index(tiny_sd, tiny_world_model):
    sd = load_backbone(tiny_sd)
    assert type(sd) is StableDiffusionBackbone and sd.path == tiny_sd
    world = load_backbone(tiny_world_model)
    assert type(world) is WorldBackbone and world.path == tiny_world_model
    assert type(load_backbone(str(tiny_sd))) is StableDiffusionBackbone  # a string path too
    assert {cls.name for cls in BACKBONES} == {"world", "sd15", "sdxl", "sd3"}
    assert backbone_class("StableDiffusionPipeline") is StableDiffusionBackbone
    assert backbone_class("StableDiffusion3Pipeline").name == "sd3"


def test_shipped_world_model_is_the_default():
    backbone = load_backbone(None)
    assert type(backbone) is WorldBackbone and backbone.resolution == 32 and backbone.sample_shape == (3, 32, 32)


def test_dtype_is_followed(tiny_sd):
    half = load_backbone(tiny_sd, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.encode_prompts(["a dog"]).states.dtype == torch.bfloat16


def test_a_folder_that_is_neither_is_refused_naming_it(tmp_path):
    empty = tmp_path / "just-photos"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(empty)) + ".*no model_index.json"):
        load_backbone(empty)
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(CheckpointError, match=re.escape(str(other / "model_index.json")) + ".*'KandinskyPipeline'.*StableDiffusionPipeline"):
        load_backbone(other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(broken / "model_index.json")) + ".*JSON"):
        load_backbone(broken)


def test_missing_folder_file_and_damaged_pipeline(tmp_path, tiny_sd):
    with pytest.raises(CheckpointError, match="model folder '.*nowhere' does not exist"):
        load_backbone(tmp_path / "nowhere")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=re.escape(str(weights)) + ".*is a file, not a model folder"):
        load_backbone(weights)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_sd, damaged)
    shutil.rmtree(damaged / "vae")
    with pytest.raises(CheckpointError, match=re.escape(str(damaged)) + ".*cannot be loaded"):
        load_backbone(damaged)


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    """A hub id while offline: an error naming the id and why, not a traceback (and no retries: offline mode)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"'nobody/no-such-model' is no local folder, and as a hub id it cannot be reached \(.*offline"):
        load_backbone("nobody/no-such-model")
