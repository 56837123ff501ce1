import pytest
import torch


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
