"""Fixtures of the training tests: a tiny SD 1.5 pipeline, a tiny CLIP vision encoder and small photo folders."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperbooth.tiny import tiny_clip_vision_encoder, tiny_sd_pipeline

#: The DreamBench photos shipped beside the repository (../shared/dreambench/dataset), located from this file.
DREAMBENCH = Path(__file__).resolve().parents[2] / ".." / "shared" / "dreambench" / "dataset"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny StableDiffusionPipeline folder of SD 1.5's own classes (16x16 images, 8x8 latents)."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP vision encoder folder (``CLIPVisionModel`` from a ``CLIPVisionConfig`` with its
    ``CLIPImageProcessor``, both ``save_pretrained``), laid out as openai/clip-vit-large-patch14 is."""
    return tiny_clip_vision_encoder(tmp_path_factory.mktemp("tiny_clip") / "clip")


def write_photo(path: Path, color, shift: int, size: int = 24) -> Path:
    """A small photo: a coloured square on grey at an offset, with a little seeded noise."""
    rng = np.random.default_rng(shift)
    image = np.full((size, size, 3), 128, np.uint8)
    image[4 + shift : 14 + shift, 6:16] = color
    image = np.clip(image.astype(int) + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def subject_folder(tmp_path):
    """DreamBench's layout: a folder per subject, three photos each, and a subject,class table."""
    root = tmp_path / "subjects"
    for name, color in (("red_toy", (220, 30, 30)), ("blue_cup", (30, 30, 220))):
        for i in range(3):
            write_photo(root / name / f"{i:02d}.png", color, shift=i)
    (tmp_path / "classes.txt").write_text(
        "Classes\n\nsubject_name,class\nred_toy,toy\nblue_cup,cup\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n"
    )
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(args: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    """Two real processes on the CPU (gloo), one thread each: ``torch.distributed.run --nproc_per_node 2``, which
    sets RANK / WORLD_SIZE for accelerate. (``accelerate launch --cpu --num_processes 2`` starts ONE process on a
    machine without GPUs: its simple launcher sets no ranks.) ``script``: what to run (default ``-m hyperbooth``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *(script or ["-m", "hyperbooth"]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def failure(result: subprocess.CompletedProcess) -> str:
    """What a failed two-process run said: rank 0's own lines (its traceback) when there are any, else the tail."""
    rank0 = [line for line in result.stderr.splitlines() if line.startswith("[rank0]")]
    return "\n".join(rank0)[-3000:] if rank0 else result.stderr[-3000:]


def train_on_two_processes(args: list[str], out: Path) -> None:
    """``hyperbooth train *args out_dir=out`` on two processes (:func:`launch_two_processes`), checked to be two."""
    result = launch_two_processes(["train", *args, f"out_dir={out}"])
    assert result.returncode == 0, failure(result)
    assert "on 2 processes" in result.stderr, result.stderr[-3000:]
