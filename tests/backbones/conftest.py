"""Fixtures of the backbone tests: a tiny SD 1.5 pipeline folder of SD 1.5's own classes, its backbone, a tiny CLIP
vision encoder folder, an e2e hypernetwork for that backbone, and reference images."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperbooth.backbones import load_backbone
from hyperbooth.methods import E2EConfig, E2EHyperNetwork
from hyperbooth.tiny import tiny_clip_vision_encoder, tiny_sd_pipeline


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine two threads made an 8-step
    sampling run 40x slower (0.3 s → 12 s, measured): these tests run single-threaded, and restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny ``StableDiffusionPipeline`` folder (``save_pretrained``), loaded as a real SD 1.5 folder is."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "sd15")


@pytest.fixture(scope="session")
def sd(tiny_sd):
    return load_backbone(tiny_sd)


@pytest.fixture(scope="session")
def clip_encoder(tmp_path_factory) -> Path:
    """A tiny ``CLIPVisionModel`` folder with its ``CLIPImageProcessor``."""
    return tiny_clip_vision_encoder(tmp_path_factory.mktemp("clip_vision") / "encoder")


def make_sd_hypernet(backbone, encoder: Path, folder: Path, seed: int = 0) -> Path:
    """A tiny e2e hypernetwork for ``backbone`` saved to ``folder``, with a non-zero ``head_B`` so its LoRA acts."""
    torch.manual_seed(seed)
    hypernet = E2EHyperNetwork.for_backbone(E2EConfig(d_model=32, layers=1, heads=2, encoder=str(encoder)), backbone)
    for head in hypernet.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.5)
    return hypernet.save_pretrained(folder)


@pytest.fixture(scope="session")
def sd_hypernet(sd, clip_encoder, tmp_path_factory) -> Path:
    return make_sd_hypernet(sd, clip_encoder, tmp_path_factory.mktemp("sd_hypernet") / "hypernet")


@pytest.fixture(scope="session")
def ref_pngs(tmp_path_factory) -> list[Path]:
    """Two 24x24 photos of one 'subject' (a coloured square on a grey field, moved a little)."""
    root = tmp_path_factory.mktemp("refs")
    paths = []
    for i, offset in enumerate((3, 7)):
        im = Image.new("RGB", (24, 24), (128, 128, 128))
        im.paste((200, 40, 60), (offset, offset, offset + 12, offset + 12))
        paths.append(root / f"ref{i}.png")
        im.save(paths[-1])
    return paths


def pipeline_images(pipe, scheduler: str, steps: int, seed: int, guidance_scale: float, prompts) -> torch.Tensor:
    """A diffusers pipeline's own ``__call__`` with hyperbooth's scheduler of that name; images mapped to [-1, 1]."""
    from hyperbooth.sampling import make_scheduler

    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, original)
    try:
        out = pipe(prompts, guidance_scale=guidance_scale, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    finally:
        pipe.scheduler = original
    return out.images * 2 - 1
