"""Acceptance of the library layer: a method defined and registered in this one file goes through every part —
``hyperbooth train`` (2 steps) → ``hyperbooth personalize`` (a LoRA file) → ``generate`` with CFG and HM-CFG →
the world table — with no other file changed. Only the Personalizer interface is used by those parts."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.cli import main
from hyperbooth.diffusion import diffusion_loss
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.lora import load_lora
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.methods import Personalizer, TrainBatch, register
from hyperbooth.world.oracles import ContextClassifier, IdentityEncoder, OracleTrainConfig, Oracles, save_oracles
from hyperbooth.world.personalization import evaluate_personalization
from hyperbooth.world.protocol import personalization_rows


@dataclass
class ColourConfig:
    rank: int = 1
    targets: tuple[str, ...] = ("to_q", "to_v")

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"hypernet.rank={self.rank} must be at least 1")


@register
class MeanColourLoRA(Personalizer):
    """A toy hypernetwork: the references' mean colour (3 numbers) → a rank-r LoRA per target, by two linear maps."""

    method = "toy-mean-colour"
    config_class = ColourConfig

    def __init__(self, config: ColourConfig, target_shapes: dict):
        super().__init__(config, target_shapes)
        r = config.rank
        self.to_A = nn.ModuleDict({n.replace(".", "_"): nn.Linear(3, r * d_in) for n, (d_in, _) in self.target_shapes.items()})
        self.to_B = nn.ModuleDict({n.replace(".", "_"): nn.Linear(3, d_out * r) for n, (_, d_out) in self.target_shapes.items()})
        for head in self.to_B.values():
            nn.init.normal_(head.weight, std=1e-3)

    def forward(self, references: torch.Tensor) -> LoRAWeights:
        colour = references.mean(dim=(1, 3, 4))  # (N, k, 3, H, W) → (N, 3)
        n, r = colour.shape[0], self.config.rank
        A = {name: self.to_A[name.replace(".", "_")](colour).view(n, r, d_in) for name, (d_in, _) in self.target_shapes.items()}
        B = {name: self.to_B[name.replace(".", "_")](colour).view(n, d_out, r) for name, (_, d_out) in self.target_shapes.items()}
        return LoRAWeights.from_factors(A, B, alpha=float(r))

    def training_loss(self, batch: TrainBatch, backbone):
        weights = self(batch.references)
        with backbone.apply_lora(weights, mode="per_sample"):
            pred = backbone.denoise(batch.x_t, batch.t, batch.cond)
        loss = diffusion_loss(pred, batch.target, batch.loss_weights)
        return loss, {"diffusion_loss": loss}


@pytest.fixture(scope="module")
def trained(tiny_world_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_train")
    args = ["train", "method=toy-mean-colour", f"base_model={tiny_world_model}", f"out_dir={out}", "hypernet.rank=2",
            "optim.batch_size=2", "optim.max_steps=2", "optim.warmup_steps=1", "optim.lr=1e-2", "data.num_workers=0",
            "log_every=1", "checkpoint_every=1"]
    assert main(args) == 0
    return out


def test_train_personalize_generate_and_the_world_table(trained, tiny_world_model, tmp_path):
    folder = trained / "hypernet"
    meta = json.loads((folder / methods.CONFIG_NAME).read_text())
    assert meta["method"] == "toy-mean-colour" and meta["config"]["rank"] == 2
    toy = methods.load(folder)
    assert type(toy) is MeanColourLoRA
    fresh = MeanColourLoRA(toy.config, toy.target_shapes)
    assert any(not torch.equal(a, b) for a, b in zip(toy.state_dict().values(), fresh.state_dict().values()))  # it trained
    with open(trained / "log.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2"]

    # personalize: photos → a LoRA file that names the method and the hypernetwork that made it
    from PIL import Image

    photo = tmp_path / "subject.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(photo)
    lora_file = tmp_path / "subject.safetensors"
    assert main(["personalize", "--model", str(tiny_world_model), "--hypernet", str(folder), "--images", str(photo), "--out", str(lora_file)]) == 0
    with safe_open(str(lora_file), "pt") as f:
        header = f.metadata()
    assert header["hyperbooth.method"] == "toy-mean-colour" and header["hyperbooth.hypernet"].startswith("hypernet")

    # generate with CFG and HM-CFG, from the file and from the method directly: the same LoRA either way
    backbone = load_backbone(tiny_world_model)
    lora = load_lora(lora_file, backbone.unet).unet
    ref = torch.full((1, 1, 3, 32, 32), 0.0)
    ref[:, :, 0] = 200 / 127.5 - 1
    ref[:, :, 1] = ref[:, :, 2] = 30 / 127.5 - 1
    direct = toy.personalize(ref, backbone)
    prompts = ["a sks toy in the snow"]
    base_cfg = generate(backbone, prompts, None, guidance="cfg", steps=2, seed=1)
    for guidance in ("cfg", "hm-cfg"):
        from_file = generate(backbone, prompts, lora, guidance=guidance, steps=2, seed=1)
        torch.testing.assert_close(from_file, generate(backbone, prompts, direct, guidance=guidance, steps=2, seed=1), atol=1e-4, rtol=0)
        assert (from_file - base_cfg).abs().max() > 1e-4  # the LoRA acts
    assert main(["generate", "--model", str(tiny_world_model), "--hypernet", str(folder), "--images", str(photo), "--prompt", "a sks toy",
                 "--guidance", "hm-cfg", "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()

    # the world table, with the folder of the trained method
    torch.manual_seed(0)
    oracles_dir = save_oracles(tmp_path / "oracles", IdentityEncoder().eval(), ContextClassifier().eval(), OracleTrainConfig(), {})
    rows = personalization_rows(["toy"], guidance_scales=[3.0], hm_pairs=[(2.0, 2.0)])
    result = evaluate_personalization(backbone, Oracles.load(oracles_dir), {"toy": folder}, rows, num_identities=2, prompts_per_identity=1, steps=1)
    labels = [r["label"] for r in result["rows"]]
    assert labels[2:] == ["toy cfg g=3", "toy hm-cfg w_base=2 w_pers=2"]
    assert all(r["method"] == "toy-mean-colour" for r in result["rows"][2:])
