"""A method defined here, in one test file, runs through both evaluation harnesses with no other file changed: the
world table (as an object and as a folder, CFG and HM-CFG, via ``hyperbooth world eval-personalization`` too) and
``hyperbooth eval`` (by folder, and built from its config by its registered name). The harnesses use only the
Personalizer interface: ``needs_class_names`` decides whether class names are passed, and a method that keeps its
own clock (``seconds_per_subject``) is timed by it, without a warm-up call."""

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.cli import main
from hyperbooth.config import load_config
from hyperbooth.evaluation.protocol import EvalConfig, run_eval
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.methods import Personalizer, register
from hyperbooth.world.identity import identity_class
from hyperbooth.world.oracles import ContextClassifier, IdentityEncoder, OracleTrainConfig, Oracles, save_oracles
from hyperbooth.world.personalization import evaluate_personalization, load_personalizers
from hyperbooth.world.protocol import personalization_rows
from hyperbooth.world.splits import identity_seeds


@dataclass
class ToyConfig:
    rank: int = 1
    scale: float = 0.3

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be at least 1")


def _constant_lora(shapes: dict, n: int, config: ToyConfig, gain: torch.Tensor) -> LoRAWeights:
    """The same small LoRA for each of ``n`` subjects: fixed cosine patterns, times ``gain``."""
    A, B = {}, {}
    for i, (name, (d_in, d_out)) in enumerate(sorted(shapes.items())):
        a = torch.cos(torch.arange(config.rank * d_in, dtype=torch.float32) * (0.7 + 0.01 * i)).view(config.rank, d_in)
        b = torch.sin(torch.arange(d_out * config.rank, dtype=torch.float32) * (1.3 + 0.01 * i)).view(d_out, config.rank)
        A[name] = (config.scale * gain * a).expand(n, -1, -1).contiguous()
        B[name] = (config.scale * b).expand(n, -1, -1).contiguous()
    return LoRAWeights.from_factors(A, B, alpha=float(config.rank))


@register
class ToyConstant(Personalizer):
    """A trainable toy hypernetwork: one learned gain on a constant LoRA, whatever the references."""

    method = "toy-constant"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig, target_shapes: dict):
        super().__init__(config, target_shapes)
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, references: torch.Tensor) -> LoRAWeights:
        return _constant_lora(self.target_shapes, references.shape[0], self.config, self.gain)


@register
class ToyFinetune(Personalizer):
    """A toy per-subject "fine-tune": not trained ahead, needs class names, keeps its own clock."""

    method = "toy-finetune"
    config_class = ToyConfig
    trainable: ClassVar[bool] = False
    needs_class_names: ClassVar[bool] = True
    own_clock: ClassVar[bool] = True

    def __init__(self, config: ToyConfig, target_shapes: dict):
        super().__init__(config, target_shapes)
        self.seconds_per_subject = float("nan")
        self.calls: list[list[str]] = []

    def forward(self, references):
        raise AssertionError("the harness must go through personalize()")

    def personalize(self, references, backbone=None, class_names=None):
        assert backbone is not None and class_names is not None and len(class_names) == references.shape[0]
        self.calls.append(list(class_names))
        self.seconds_per_subject = 0.25  # its own clock: what the harness must report
        return _constant_lora(self.target_shapes, references.shape[0], self.config, torch.tensor(1.0))


@pytest.fixture(scope="module")
def base(tiny_world_model):
    return WorldBackbone.from_pretrained(tiny_world_model)


@pytest.fixture(scope="module")
def oracles_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_oracles(tmp_path_factory.mktemp("toy_oracles"), IdentityEncoder().eval(), ContextClassifier().eval(), OracleTrainConfig(), {})


@pytest.fixture(scope="module")
def toy_dir(base, tmp_path_factory):
    return ToyConstant.for_backbone(ToyConfig(), base).save_pretrained(tmp_path_factory.mktemp("toy") / "hypernet")


def test_world_table_runs_a_toy_method_as_object_and_as_folder(base, oracles_dir, toy_dir):
    oracles = Oracles.load(oracles_dir)
    toy = ToyConstant.for_backbone(ToyConfig(), base)
    rows = personalization_rows(["obj", "dir"], guidance_scales=[3.0], hm_pairs=[(2.0, 2.0)])
    result = evaluate_personalization(base, oracles, {"obj": toy, "dir": toy_dir}, rows, num_identities=2, prompts_per_identity=2, steps=2)
    by_label = {r["label"]: r for r in result["rows"]}
    assert list(by_label) == ["references (renders, k=1)", "floor cfg g=3", "obj cfg g=3", "obj hm-cfg w_base=2 w_pers=2", "dir cfg g=3", "dir hm-cfg w_base=2 w_pers=2"]
    assert result["settings"]["methods"] == {"obj": "toy-constant", "dir": "toy-constant"}
    for label in ("cfg g=3", "hm-cfg w_base=2 w_pers=2"):
        obj, folder = by_label[f"obj {label}"], by_label[f"dir {label}"]
        assert obj["method"] == folder["method"] == "toy-constant"
        assert obj["subject"] == folder["subject"] and obj["prompt"] == folder["prompt"]  # the same LoRA either way
        assert obj["hypernet_ms_per_subject"] > 0 and math.isfinite(obj["subject"])
    floor = by_label["floor cfg g=3"]
    assert floor["method"] is None and by_label["obj cfg g=3"]["subject"] != floor["subject"]  # the toy LoRA acts
    # a lone personalizer is labelled by its method's name, as a lone folder is
    alone = evaluate_personalization(base, oracles, toy, personalization_rows(["toy-constant"], hm_pairs=[(2.0, 2.0)]), num_identities=1, prompts_per_identity=1, steps=1)
    assert [r["label"] for r in alone["rows"]][2:] == ["toy-constant cfg g=3", "toy-constant hm-cfg w_base=2 w_pers=2"]
    assert list(load_personalizers([toy_dir])) == ["toy-constant"]


def test_world_table_uses_the_interface_attributes_of_a_method(base, oracles_dir):
    oracles = Oracles.load(oracles_dir)
    toy = ToyFinetune.for_backbone(ToyConfig(), base)
    rows = personalization_rows(["ft"], refs=[2], guidance_scales=[3.0], hm_pairs=[(2.0, 2.0)])
    result = evaluate_personalization(base, oracles, {"ft": toy}, rows, num_identities=2, prompts_per_identity=1, steps=1)
    seeds = list(identity_seeds("test", 2))
    assert toy.calls == [[identity_class(s) for s in seeds]]  # the class names, once: no warm-up call for its own clock
    for row in result["rows"][2:]:
        assert row["hypernet_ms_per_subject"] == pytest.approx(250.0) and row["method"] == "toy-finetune"


def test_cli_world_table_takes_a_toy_folder(tiny_world_model, oracles_dir, toy_dir, tmp_path, capsys):
    out = tmp_path / "toy.json"
    assert main(["world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir), "--hypernet", str(toy_dir),
                 "--num-identities", "1", "--prompts", "1", "--steps", "1", "--json", str(out)]) == 0
    assert "| toy-constant hm-cfg w_base=2 w_pers=2 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["settings"]["methods"] == {"toy-constant": "toy-constant"}
    assert result["settings"]["hypernet_folders"]["toy-constant"].startswith(str(toy_dir.resolve()))


def _world_eval(model, oracles, *more):
    return [f"backend.model={model}", f"metrics.oracles={oracles}", "backend.steps=1", "data.world_subjects=1", "data.world_references=2",
            "data.max_prompts=1", "images_per_prompt=1", *more]


def test_hyperbooth_eval_runs_a_toy_method_by_folder_and_by_name(tiny_world_model, oracles_dir, toy_dir, tmp_path):
    cfg = load_config(EvalConfig, "configs/eval_world.yaml", _world_eval(tiny_world_model, oracles_dir, "method.kind=personalizer", f"method.path={toy_dir}", "method.guidance=hm-cfg"))
    results = run_eval(cfg, tmp_path / "folder.json")
    (subject,) = results["subjects"].values()
    assert results["status"] == "complete" and results["method"]["kind"] == "toy-constant"
    assert list(subject["prompts"])[0].startswith("a sks ") and subject["personalize_seconds"] > 0

    cfg = load_config(EvalConfig, "configs/eval_world.yaml", _world_eval(tiny_world_model, oracles_dir, "method.kind=toy-finetune", "method.options={scale: 0.1}"))
    results = run_eval(cfg, tmp_path / "name.json")
    (subject,) = results["subjects"].values()
    assert results["status"] == "complete" and results["method"]["kind"] == "toy-finetune"
    assert subject["personalize_seconds"] == pytest.approx(0.25)  # its own clock
    assert "'scale': 0.1" in results["method"]["description"]
