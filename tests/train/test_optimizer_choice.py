"""``optim.optimizer``: torch's AdamW by default (unchanged), bitsandbytes' 8-bit AdamW when asked for and importable,
a ConfigError naming the value (and the package) otherwise; checkpoints written before the field existed resume."""

import csv
import shutil
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from hyperbooth.config import load_config
from hyperbooth.errors import ConfigError
from hyperbooth.train import engine
from hyperbooth.train.base import BaseTrainConfig
from hyperbooth.train.engine import load_train_config, train
from hyperbooth.train.optim import OptimConfig, build_optimizer
from hyperbooth.train.state import _write_manifest, load_state, save_state

TINY = ["hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}", "optim.batch_size=4", "optim.warmup_steps=1",
        "data.num_workers=0", "log_every=1", "checkpoint_every=2"]


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]


def test_the_default_is_torch_adamw_with_the_configs_settings():
    cfg = OptimConfig(lr=2e-4, weight_decay=0.05)
    assert cfg.optimizer == "adamw"
    optimizer, schedule = build_optimizer(_params(), cfg)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.05 and group["initial_lr"] == 2e-4
    assert load_train_config(None, []).optim.optimizer == "adamw"


def test_adamw8bit_without_bitsandbytes_is_a_config_error_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError, installed or not
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    cfg = load_train_config(None, ["optim.optimizer=adamw8bit"])  # a valid name: the config loads on any machine
    with pytest.raises(ConfigError, match=r"optim.optimizer='adamw8bit' needs the 'bitsandbytes' package.*pip install bitsandbytes"):
        build_optimizer(_params(), cfg.optim)
    # train fails before it loads the backbone (this base_model does not exist)
    cfg = load_train_config(None, [*TINY, "optim.optimizer=adamw8bit", f"base_model={tmp_path / 'missing'}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_adamw8bit_is_bitsandbytes_adamw8bit_when_importable(monkeypatch):
    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes.optim.AdamW8bit (not installed here: it needs CUDA)
        pass

    package = types.ModuleType("bitsandbytes")
    package.optim = types.ModuleType("bitsandbytes.optim")
    package.optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", package.optim)
    optimizer, _ = build_optimizer(_params(), OptimConfig(optimizer="adamw8bit", lr=1e-3, weight_decay=0.0))
    assert type(optimizer) is AdamW8bit and optimizer.param_groups[0]["initial_lr"] == 1e-3


@pytest.mark.parametrize("overrides", [["optim.optimizer=sgd"], ["optim.optimizer=AdamW"]])
def test_an_unknown_optimizer_is_a_config_error_listing_the_known_ones(overrides):
    with pytest.raises(ConfigError, match=r"optim.optimizer='\w+' is not one of 'adamw', 'adamw8bit'"):
        load_train_config(None, overrides)
    with pytest.raises(ConfigError, match=r"is not one of 'adamw', 'adamw8bit'"):
        load_config(BaseTrainConfig, None, overrides)  # train-base shares the optim section
    with pytest.raises(ConfigError, match=r"is not one of 'adamw', 'adamw8bit'"):
        build_optimizer(_params(), OptimConfig(optimizer="sgd"))


def test_a_checkpoint_written_before_optim_optimizer_existed_resumes_exactly(tiny_world_model, tmp_path):
    cfg = lambda out: load_train_config(None, [*TINY, f"base_model={tiny_world_model}", f"out_dir={out}", "optim.max_steps=3"])  # noqa: E731
    train(cfg(tmp_path / "full"))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "hypernet")
    shutil.rmtree(part / "checkpoints" / "step-0000003")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    folder = part / "checkpoints" / "step-0000002"
    state = load_state(folder / "state.pt")
    assert state["config"]["optim"].pop("optimizer") == "adamw"  # as an older hyperbooth wrote it
    save_state(folder / "state.pt", state)
    _write_manifest(folder)
    train(cfg(part), resume=True)

    def losses(out):
        with open(out / "log.csv") as f:
            return [r["loss"] for r in csv.DictReader(f)]

    assert losses(part) == losses(tmp_path / "full")


def test_deepspeed_is_refused_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "Accelerator", lambda **_: SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    cfg = load_train_config(None, [*TINY, f"base_model={tmp_path / 'missing'}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="data parallel .* or FSDP2 .*not DEEPSPEED"):
        train(cfg)
    assert not (tmp_path / "out").exists()
