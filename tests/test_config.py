from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hyperbooth.config import config_from_dict, load_config, save_config, to_dict
from hyperbooth.errors import ConfigError
from hyperbooth.evaluation.protocol import EvalConfig
from hyperbooth.train.base import BaseTrainConfig
from hyperbooth.train.engine import load_train_config
from hyperbooth.train.preoptimize import PreoptConfig


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str | None = None

    def validate(self):
        if self.steps < 1:
            raise ConfigError(f"inner.steps={self.steps} must be at least 1")


@dataclass
class Outer:
    out_dir: str = "runs/x"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 0.5\nsizes: [3, 4]\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "flag=true", "inner.name=abc"])
    assert cfg.inner.lr == 0.5 and cfg.inner.steps == 7 and cfg.flag is True and cfg.sizes == (3, 4)
    assert cfg.inner.name == "abc" and cfg.out_dir == "runs/x"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "content,overrides,match",
    [
        ("inner:\n  lrr: 1\n", [], "unknown config key 'inner.lrr'"),
        ("", ["inner.bogus=1"], "unknown config key 'inner.bogus'"),
        ("", ["inner.steps=abc"], "inner.steps='abc' must be an integer"),
        ("", ["inner.steps=0"], "inner.steps=0 must be at least 1"),
        ("", ["inner.lr=fast"], "inner.lr='fast' must be a number"),
        ("inner:\n  lr: nan\n", [], "inner.lr='nan' must be a number"),
        ("", ["flag=maybe"], "flag='maybe' must be true or false"),
        ("", ["noequals"], "key=value"),
        ("- a\n- b\n", [], "mapping at the top level"),
        ("a: [\n", [], "not valid YAML"),
    ],
)
def test_bad_values_are_named(tmp_path, content, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, path, overrides)


def test_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; a float field takes it as the number, from a file or an override
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 2e-4\n")
    assert load_config(Outer, path).inner.lr == 2e-4
    assert load_config(Outer, path, ["inner.lr=1e-3"]).inner.lr == 1e-3


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, "no/such/file.yaml")


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _load_preset(path: Path):
    """A shipped preset with the loader of the command it is written for (eval_*: `hyperbooth eval`, world_base*:
    `hyperbooth train-base`, *_preopt_*: `hyperbooth preoptimize`, the rest: `hyperbooth train`)."""
    if path.name.startswith("eval_"):
        return load_config(EvalConfig, path)
    if "_preopt_" in path.name:
        cfg = load_config(PreoptConfig, path)
        cfg.validate()
        return cfg
    if path.name.startswith("world_base"):
        return load_config(BaseTrainConfig, path)
    return load_train_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = _load_preset(path)
    assert to_dict(cfg)


def test_the_sd15_presets_are_gpu_recipes():
    names = {p.name for p in CONFIGS}
    assert {"e2e_world.yaml", "e2e_sd15.yaml", "e2e_sd15_faces.yaml", "world_base.yaml"} <= names
    for name, kind in (("e2e_sd15.yaml", "dreambench"), ("e2e_sd15_faces.yaml", "folder")):
        cfg = load_train_config(Path(CONFIGS[0].parent / name))
        assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.data.kind == kind
        assert cfg.hypernet.encoder == "openai/clip-vit-large-patch14" and cfg.method == "e2e"
