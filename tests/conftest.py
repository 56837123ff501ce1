import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as a module (registered in ``sys.modules`` while in use: dataclasses look
    their module up there)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TINY_UNET = "unet={block_out_channels: [16, 32, 32], layers_per_block: 1, norm_num_groups: 8, attention_head_dim: 2, addition_embed_type_num_heads: 2}"


@pytest.fixture(scope="session")
def tiny_world_model(tmp_path_factory):
    """A tiny world base-model folder (1 training step), built with the real trainer and loaders."""
    from hyperbooth.config import load_config
    from hyperbooth.train.base import BaseTrainConfig, train_base

    out = tmp_path_factory.mktemp("tiny_world")
    cfg = load_config(BaseTrainConfig, None, [TINY_UNET, f"out_dir={out}", "optim.max_steps=1", "optim.batch_size=2", "data.num_workers=0"])
    return train_base(cfg)
