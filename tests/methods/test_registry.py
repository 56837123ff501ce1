"""The method registry and the Personalizer files: load() picks the class a folder names; errors name the folder."""

import json
from dataclasses import dataclass

import pytest
import torch

from hyperbooth import methods
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.methods import CONFIG_NAME, DreamBoothLoRA, E2EConfig, E2EHyperNetwork, FinetuneConfig, Personalizer, register

SHAPES = {"down.attn.to_q": (8, 8), "down.attn.to_k": (12, 8)}


def _e2e(seed: int = 0) -> E2EHyperNetwork:
    torch.manual_seed(seed)
    net = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), SHAPES)
    for head in net.head_B.values():  # a non-zero LoRA, so a round trip can be told from a fresh model
        torch.nn.init.normal_(head.weight, std=0.2)
    return net.eval()


def test_the_shipped_methods_are_registered():
    assert methods.get("e2e") is E2EHyperNetwork
    assert methods.get("dreambooth-lora") is DreamBoothLoRA
    assert E2EHyperNetwork.trainable and not DreamBoothLoRA.trainable
    assert DreamBoothLoRA.needs_class_names and not E2EHyperNetwork.needs_class_names


def test_load_returns_the_class_the_folder_names(tmp_path):
    net = _e2e()
    folder = net.save_pretrained(tmp_path / "e2e")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["method"] == "e2e" and meta["config"]["output_reg"] == net.config.output_reg
    loaded = methods.load(folder)
    assert type(loaded) is E2EHyperNetwork
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = net(refs).deltas(), loaded(refs).deltas()
    assert all(torch.equal(a[k], b[k]) for k in a)

    fine = DreamBoothLoRA(FinetuneConfig(steps=7, rank=2)).save_pretrained(tmp_path / "db")
    assert not (fine / "hypernet.safetensors").exists()  # nothing learned ahead: the config is the whole method
    loaded = methods.load(fine)
    assert type(loaded) is DreamBoothLoRA and loaded.config.steps == 7 and loaded.config.rank == 2


def test_unknown_method_and_bad_folders_are_named(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"method": "nope", "config": {}}))
    with pytest.raises(ConfigError, match=r"odd.*method 'nope' is not a registered method; available: .*e2e"):
        methods.load(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        methods.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"empty is not a hypernetwork folder .*{CONFIG_NAME}"):
        methods.load(tmp_path / "empty")
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        methods.load(folder)
    # a config value the method's config rejects
    bad = _e2e().save_pretrained(tmp_path / "bad")
    meta = json.loads((bad / CONFIG_NAME).read_text())
    meta["config"]["multi_reference"] = "median"
    (bad / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="multi_reference='median'"):
        methods.load(bad)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _e2e().save_pretrained(tmp_path / "e2e")
    state = load_file(str(folder / "hypernet.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(folder / "hypernet.safetensors"))
    with pytest.raises(CheckpointError, match="does not match its config"):
        methods.load(folder)
    (folder / "hypernet.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="missing or damaged"):
        methods.load(folder)


def test_register_refuses_a_second_class_under_a_taken_name():
    @dataclass
    class Cfg:
        rank: int = 1

    class Impostor(Personalizer):
        method = "e2e"
        config_class = Cfg

        def forward(self, references):
            raise NotImplementedError

    with pytest.raises(ConfigError, match="already registered by E2EHyperNetwork"):
        register(Impostor)
    Impostor.method = ""
    with pytest.raises(ConfigError, match="must set a method name"):
        register(Impostor)
    assert methods.get("e2e") is E2EHyperNetwork


def test_check_backbone_names_the_first_target_that_differs(tiny_world_model):
    from hyperbooth.backbones import load_backbone

    backbone = load_backbone(tiny_world_model)
    net = E2EHyperNetwork.for_backbone(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), backbone)
    net.check_backbone(backbone)  # built for it: fine
    assert set(net.target_shapes) == set(backbone.target_shapes(net.config.targets))
    with pytest.raises(CheckpointError, match="built for another backbone .*first target that differs: 'down\\.attn\\.to_[qk]'"):
        _e2e().check_backbone(backbone)
    w = net.personalize(torch.zeros(1, 1, 3, 32, 32), backbone)
    assert isinstance(w, LoRAWeights) and w.num_subjects == 1
