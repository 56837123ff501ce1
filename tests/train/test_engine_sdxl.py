"""``hyperbooth train`` (method e2e) on a tiny Stable Diffusion XL pipeline: two steps with the UNet's blocks
checkpointed, a hypernetwork recorded for the sdxl backbone whose LoRA samples under CFG and HM-CFG; and the GPU
preset ``configs/e2e_sdxl.yaml`` read by the engine's config loader."""

import csv
import json
from pathlib import Path

import torch

from hyperbooth import methods
from hyperbooth.backbones import StableDiffusionXLBackbone, load_backbone
from hyperbooth.cli import main
from hyperbooth.generate import generate
from hyperbooth.methods import CONFIG_NAME, E2EConfig
from hyperbooth.tiny import tiny_sdxl_pipeline
from hyperbooth.train.engine import load_train_config

PRESET = Path(__file__).resolve().parents[2] / "configs" / "e2e_sdxl.yaml"


def test_train_two_steps_on_sdxl_and_sample_with_the_result(tiny_clip, subject_folder, tmp_path):
    folder = tiny_sdxl_pipeline(tmp_path / "sdxl")
    out = tmp_path / "run"
    args = ["train", "hypernet={d_model: 32, layers: 1, heads: 2, rank: 2}", f"hypernet.encoder={tiny_clip}", f"base_model={folder}",
            "data.kind=dreambench", f"data.path={subject_folder}", "data.k=2", "data.num_workers=0", "data.cond_dropout=0.5",
            "optim.batch_size=2", "optim.warmup_steps=1", "optim.max_steps=2", "log_every=1", "checkpoint_every=2",
            "gradient_checkpointing=true", f"out_dir={out}"]
    assert main(args) == 0
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    meta = json.loads((out / "hypernet" / CONFIG_NAME).read_text())
    assert meta["backbone"] == "sdxl" and meta["base_model"] == str(folder)

    backbone = load_backbone(folder)
    assert isinstance(backbone, StableDiffusionXLBackbone) and not backbone.unet.is_gradient_checkpointing
    hypernet = methods.load(out / "hypernet")
    hypernet.check_backbone(backbone)  # built for the SDXL UNet's attention projections
    weights = hypernet.personalize(torch.rand(1, 2, 3, 16, 16) * 2 - 1, backbone)
    assert any(d.abs().sum() > 0 for d in weights.deltas().values())  # the two steps moved head_B off zero
    prompts = ["a sks toy in the jungle"]
    for guidance in ("cfg", "hm-cfg"):
        images = generate(backbone, prompts, weights, guidance=guidance, steps=2, seed=0)
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_the_sdxl_gpu_preset_is_a_valid_training_config():
    cfg = load_train_config(PRESET, [])
    assert cfg.method == "e2e" and "xl" in cfg.base_model and cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert isinstance(cfg.hypernet, E2EConfig) and cfg.hypernet.targets == ("to_q", "to_k", "to_v", "to_out.0")
