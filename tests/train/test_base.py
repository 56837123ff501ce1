import csv
import shutil

import pytest
import torch

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.config import load_config
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.generate import generate
from hyperbooth.train.base import BaseTrainConfig, train_base
from hyperbooth.train.state import load_state

TINY = [
    "unet={block_out_channels: [16, 32, 32], layers_per_block: 1, norm_num_groups: 8, attention_head_dim: 2, addition_embed_type_num_heads: 2}",
    "optim.batch_size=4",
    "optim.warmup_steps=1",
    "data.num_workers=0",
    "log_every=1",
    "checkpoint_every=2",
]


def _cfg(out, *extra):
    return load_config(BaseTrainConfig, None, [*TINY, f"out_dir={out}", *extra])


def _losses(out):
    with open(out / "log.csv") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def test_tiny_run_exports_a_loadable_model_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    folder = train_base(_cfg(full, "optim.max_steps=3"))
    assert (full / "config.yaml").is_file() and (full / "checkpoints" / "latest").is_file()
    model = WorldBackbone.from_pretrained(folder)
    images = generate(model, ["a toy in the snow", "a red ball"], steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    state = load_state(full / "checkpoints" / "step-0000003" / "state.pt")  # weights_only: the EMA state included
    assert state["ema"]["optimization_step"] == 3 and len(state["ema"]["shadow_params"]) == len(list(model.unet.parameters()))

    # interrupt after step 2: the run's own step-2 checkpoint, as a crash after it would leave it; then resume
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-0000003")
    shutil.rmtree(part / "model")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    train_base(_cfg(part, "optim.max_steps=3"), resume=True)
    assert _losses(part)[3] == pytest.approx(_losses(full)[3], rel=0, abs=0)
    with open(part / "log.csv") as f:  # the crashed run's step-3 row is replaced, not repeated
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    uninterrupted = WorldBackbone.from_pretrained(folder).unet.state_dict()
    resumed = WorldBackbone.from_pretrained(part / "model").unet.state_dict()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_bad_config_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="diffusion.prediction_type='flow'"):
        _cfg(tmp_path, "diffusion.prediction_type=flow")
    with pytest.raises(ConfigError, match="optim.bogus"):
        _cfg(tmp_path, "optim.bogus=1")
    with pytest.raises(ConfigError, match="data.resolution"):
        _cfg(tmp_path, "data.resolution=x")
    with pytest.raises(ConfigError, match="describe_full must be a probability in \\[0, 1\\], got 1.5"):
        _cfg(tmp_path, "data.describe_full=1.5")
    with pytest.raises(ConfigError, match="describe_color \\+ describe_full must be at most 1"):
        _cfg(tmp_path, "data.describe_color=0.5", "data.describe_full=0.6")


def test_missing_or_damaged_model_names_file_and_fix(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json.*train-base"):
        WorldBackbone.from_pretrained(tmp_path)


def test_init_from_continues_a_model_and_refuses_another_shape(tmp_path):
    first = train_base(_cfg(tmp_path / "one", "optim.max_steps=1"))
    start = WorldBackbone.from_pretrained(first).unet.state_dict()
    cont = _cfg(tmp_path / "two", "optim.max_steps=1", f"init_from={first}", "optim.lr=1e-12", "optim.ema_decay=0")
    second = WorldBackbone.from_pretrained(train_base(cont)).unet.state_dict()
    # a vanishing learning rate: the continued model is the first one (fp16 export both times), not a fresh init
    assert all(torch.allclose(second[k].float(), start[k].float(), atol=1e-3) for k in start)
    with pytest.raises(ConfigError, match="init_from=.*block_out_channels"):
        train_base(_cfg(tmp_path / "three", "optim.max_steps=1", f"init_from={first}", "unet={block_out_channels: [8, 16, 16], norm_num_groups: 8}"))
    with pytest.raises(ConfigError, match="init_from=.*nowhere"):
        train_base(_cfg(tmp_path / "four", "optim.max_steps=1", f"init_from={tmp_path / 'nowhere'}"))
