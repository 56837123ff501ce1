"""Fixtures of the page's tests: a tiny SD 1.5 pipeline with a tiny CLIP vision encoder and an (untrained) e2e
hypernetwork for it, and the tiny world model with one for the world."""

import pytest
import torch

from hyperbooth.backbones import load_backbone
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.tiny import tiny_clip_vision_encoder, tiny_sd_pipeline


def _nonzero(net: E2EHyperNetwork) -> E2EHyperNetwork:
    """B heads off zero, so the LoRA changes the images (as a trained one does)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in net.head_B.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
    return net


@pytest.fixture(scope="session")
def sd_studio_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_sd")
    pipe, clip = tiny_sd_pipeline(root / "pipe"), tiny_clip_vision_encoder(root / "clip")
    backbone = load_backbone(pipe)
    net = _nonzero(E2EHyperNetwork.for_backbone(E2EConfig(d_model=32, layers=1, heads=2, rank=2, encoder=str(clip)), backbone))
    return pipe, net.save_pretrained(root / "hypernet")


@pytest.fixture(scope="session")
def world_hypernet(tiny_world_model, tmp_path_factory):
    backbone = load_backbone(tiny_world_model)
    net = _nonzero(E2EHyperNetwork.for_backbone(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16, rank=2), backbone))
    return net.save_pretrained(tmp_path_factory.mktemp("ui_world") / "hypernet")
