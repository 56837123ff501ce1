"""``benchmarks/train_memory.py``: the published parameter counts of the backbones it builds on meta, the 8-bit
AdamW byte rule, the preset → backbone mapping, and the SD 1.5 figures BENCHMARKS.md quotes."""

from pathlib import Path

import pytest

from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_memory():
    with benchmark_module("train_memory") as module:
        yield module


def test_moment_bytes_of_adamw_and_bitsandbytes_8bit(train_memory):
    assert train_memory.moment_bytes([10_000, 100], "adamw") == 8 * 10_100
    # 8-bit state (+ two fp32 absmax per 256) from min_8bit_size = 4096 elements; 32-bit state below it
    assert train_memory.moment_bytes([4096, 4095], "adamw8bit") == pytest.approx(4096 * (2 + 8 / 256) + 8 * 4095)


@pytest.mark.parametrize(("base_model", "key"), [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"), ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3"), ("models/sd3.5-medium", "sd3")])
def test_the_presets_base_model_picks_the_backbone(train_memory, base_model, key):
    assert train_memory.backbone_of(base_model) == key


def test_published_parameter_counts_on_meta(train_memory):
    import torch

    expected = {("sdxl", "UNet"): 2_567_463_684, ("sdxl", "text encoder 2 (OpenCLIP ViT-bigG/14 text)"): 694_659_840,
                ("sd3", "MMDiT transformer"): 2_028_328_000, ("sd3", "text encoder 3 (T5-XXL encoder)"): 4_762_310_656}
    with torch.device("meta"):
        for (key, part), n in expected.items():
            assert train_memory.count(train_memory.BACKBONES[key].parts[part]()) == n, (key, part)


def test_sd15_figures_quoted_in_benchmarks_md(train_memory, capsys):
    assert train_memory.main(["--preset", str(ROOT / "configs" / "e2e_sd15.yaml"), "--batch-per-gpu", "1", "--gpus", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 1 | 6.3 | 4.4 | 6.1 | 4.2 |" in out and "| 8 | 1 | 6.4 | 4.5 | 6.2 | 4.3 |" in out
    assert "2.50 GB without gradient checkpointing, 0.59 GB with it" in out
