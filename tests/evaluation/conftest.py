"""Tiny random metric models (CLIP, DINOv2, ViT) and world oracles, saved to folders and loaded back through the
real loading code; a DreamBench-layout folder with one subject."""

import shutil
from pathlib import Path

import pytest
import torch

DREAMBENCH = Path(__file__).resolve().parents[3] / "shared" / "dreambench" / "dataset"  # shared/ beside the repository
PROMPTS_FILE = DREAMBENCH / "prompts_and_classes.txt"

needs_dreambench = pytest.mark.skipif(not PROMPTS_FILE.is_file(), reason="DreamBench (../shared/dreambench) is not beside the repository")


def _vision(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, **extra)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from hyperbooth.tiny import _write_tiny_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=_vision(), projection_dim=16)).save_pretrained(folder)
    _write_tiny_clip_tokenizer(folder / "tok").save_pretrained(folder)
    shutil.rmtree(folder / "tok")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _save_dino(folder: Path, kind: str) -> Path:
    torch.manual_seed(0)
    if kind == "dinov2":
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

        Dinov2Model(Dinov2Config(**_vision())).save_pretrained(folder)
        BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        from transformers import ViTConfig, ViTImageProcessor, ViTModel

        ViTModel(ViTConfig(**_vision())).save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    """A tiny Dinov2Model folder with its image processor."""
    return _save_dino(tmp_path_factory.mktemp("tiny_dinov2"), "dinov2")


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A tiny ViTModel folder (the architecture of DINO ViT-S/16) with its image processor."""
    return _save_dino(tmp_path_factory.mktemp("tiny_vit"), "vit")


@pytest.fixture(scope="session")
def random_oracles(tmp_path_factory) -> Path:
    from hyperbooth.world.oracles import ContextClassifier, IdentityEncoder, OracleTrainConfig, save_oracles

    torch.manual_seed(0)
    return save_oracles(tmp_path_factory.mktemp("oracles"), IdentityEncoder().eval(), ContextClassifier().eval(), OracleTrainConfig(), {})


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from hyperbooth.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture
def dreambench_one(tmp_path) -> Path:
    """A DreamBench-layout folder: the real prompts file and two (downsized) photos of its backpack."""
    from PIL import Image

    folder = tmp_path / "dataset"
    (folder / "backpack").mkdir(parents=True)
    shutil.copy(PROMPTS_FILE, folder / PROMPTS_FILE.name)
    for name in ("00.jpg", "01.jpg"):
        with Image.open(DREAMBENCH / "backpack" / name) as im:
            im.convert("RGB").resize((64, 64)).save(folder / "backpack" / name)
    return folder


def pattern_image(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A structured test image ``(3, size, size)`` in [-1, 1]: gradients, a bright square, noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([x, y, x * y]) * 0.8
    q = size // 4
    image[:, q : 2 * q, q : 3 * q] = torch.tensor([0.9, -0.6, 0.2])[:, None, None]
    return (image + 0.1 * torch.randn(image.shape, generator=g)).clamp(-1, 1)


def altered(image: torch.Tensor) -> torch.Tensor:
    """Rotated a quarter turn and colour-changed (channels swapped, inverted)."""
    return -torch.rot90(image, 1, dims=(1, 2))[[2, 0, 1]]
