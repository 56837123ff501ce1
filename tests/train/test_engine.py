"""The training engine on the world: 3 steps, checkpoints, exact resume, the 2-process equivalence, the log."""

import csv
import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from hyperbooth import methods
from hyperbooth.diffusion import diffusion_loss
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora import load_lora, target_shapes
from hyperbooth.lora.weights import LoRALayer, LoRAWeights
from hyperbooth.methods import CONFIG_NAME
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.train.engine import load_train_config, train
from tests.train.conftest import train_on_two_processes

TINY = ["hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}", "optim.batch_size=4", "optim.warmup_steps=1", "data.num_workers=0", "log_every=1", "checkpoint_every=2"]


def _cfg(model, out, *extra):
    return load_train_config(None, [*TINY, f"base_model={model}", f"out_dir={out}", *extra])


def _losses(out):
    with open(out / "log.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_decoder_output_is_zero_at_init():
    shapes = {"a.to_q": (8, 8), "a.to_k": (12, 8), "b.to_q": (8, 8)}
    net = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), shapes)
    w = net(torch.rand(3, 2, 3, 32, 32) * 2 - 1)
    assert w.num_subjects == 3 and set(w) == set(shapes)
    assert all(torch.count_nonzero(d) == 0 for d in w.deltas().values())
    assert all(layer.A.abs().sum() > 0 for layer in w.values())  # gradients can reach B through A


def test_save_pretrained_in_fp16_halves_the_file_and_loads_back(tmp_path):
    shapes = {"a.to_q": (8, 8), "a.to_k": (12, 8)}
    torch.manual_seed(0)
    net = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), shapes)
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.2)
    full, half = net.save_pretrained(tmp_path / "fp32"), net.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = lambda folder: (folder / "hypernet.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    loaded = E2EHyperNetwork.from_pretrained(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = net.eval()(refs).deltas(), loaded(refs).deltas()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        next(iter(net.head_B.values())).weight[0, 0] = 1e6  # beyond fp16's range
    with pytest.raises(CheckpointError, match="overflow"):
        net.save_pretrained(tmp_path / "overflow", dtype=torch.float16)
    assert not (tmp_path / "overflow").exists()  # nothing half-written


def test_three_steps_checkpoint_and_exact_resume(tiny_world_model, tmp_path):
    full = train(_cfg(tiny_world_model, tmp_path / "full", "optim.max_steps=3"))
    # interrupt after step 2: the run's own step-2 checkpoint, as a crash after it would leave it; then resume
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "hypernet")
    shutil.rmtree(part / "checkpoints" / "step-0000003")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    resumed = train(_cfg(tiny_world_model, part, "optim.max_steps=3"), resume=True)
    assert _losses(part)[3] == _losses(tmp_path / "full")[3]
    with open(part / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]  # the crashed run's step-3 row replaced, not doubled
    a, b = E2EHyperNetwork.from_pretrained(full).state_dict(), E2EHyperNetwork.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full")[1] > 0
    with pytest.raises(CheckpointError, match=r"another config \(optim.lr: 0.0003 in the checkpoint, 0.001 now\)"):
        train(_cfg(tiny_world_model, part, "optim.max_steps=3", "optim.lr=1e-3"), resume=True)


def test_init_from_starts_from_a_saved_hypernetwork(tiny_world_model, tmp_path):
    first = train(_cfg(tiny_world_model, tmp_path / "a", "optim.max_steps=2"))
    cont = train(_cfg(tiny_world_model, tmp_path / "b", "optim.max_steps=1", f"init_from={first}", "optim.lr=1e-12", "optim.ema_decay=0"))
    a, b = E2EHyperNetwork.from_pretrained(first).state_dict(), E2EHyperNetwork.from_pretrained(cont).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fresh = E2EHyperNetwork.from_pretrained(train(_cfg(tiny_world_model, tmp_path / "c", "optim.max_steps=1", "optim.lr=1e-12"))).state_dict()
    assert any(not torch.allclose(a[k], fresh[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="init_from=.*does not fit"):
        train(_cfg(tiny_world_model, tmp_path / "d", "optim.max_steps=1", f"init_from={first}", "hypernet.rank=3"))


def test_lambda_zero_and_the_methods_scalars_logged(tiny_world_model, tmp_path):
    train(_cfg(tiny_world_model, tmp_path, "optim.max_steps=2", "hypernet.output_reg=0", "data.mode=same"))
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "diffusion_loss", "reg", "lr", "samples_per_s", "elapsed_s"]
    assert float(rows[-1]["reg"]) > 0  # ΔW left zero after the first update
    assert float(rows[-1]["loss"]) == float(rows[-1]["diffusion_loss"])  # λ = 0: the loss is the diffusion loss


def test_save_dtype_fp16_stores_the_final_folder_in_half_and_checkpoints_in_full(tiny_world_model, tmp_path):
    from safetensors import safe_open

    final = train(_cfg(tiny_world_model, tmp_path, "optim.max_steps=2", "save_dtype=fp16"))

    def dtypes(folder):
        with safe_open(str(folder / "hypernet.safetensors"), "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    assert dtypes(final) == {"F16"}
    assert dtypes(tmp_path / "checkpoints" / "step-0000002" / "hypernet") == {"F32"}
    assert all(p.dtype == torch.float32 for p in E2EHyperNetwork.from_pretrained(final).parameters())
    with pytest.raises(ConfigError, match="save_dtype='bf8'"):
        _cfg(tiny_world_model, tmp_path, "save_dtype=bf8")


def test_personalize_writes_a_file_both_loaders_read(tiny_world_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from hyperbooth.cli import main

    hypernet = train(_cfg(tiny_world_model, tmp_path / "run", "optim.max_steps=2"))
    img = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(img)
    out = tmp_path / "subject.safetensors"
    assert main(["personalize", "--images", str(img), "--out", str(out), "--hypernet", str(hypernet), "--model", str(tiny_world_model)]) == 0
    unet = UNet2DConditionModel.from_pretrained(tiny_world_model, subfolder="unet")
    lora = load_lora(out, unet)
    assert set(lora.unet) == set(target_shapes(unet))
    unet.load_lora_adapter(str(out), prefix="unet")  # diffusers' own loader
    assert any("lora" in name for name, _ in unet.named_modules())


def test_bad_inputs_are_named(tiny_world_model, tmp_path, capsys):
    from hyperbooth.cli import main

    with pytest.raises(ConfigError, match="optim.nope"):
        _cfg(tiny_world_model, tmp_path, "optim.nope=1")
    with pytest.raises(ConfigError, match="hypernet.nope"):
        _cfg(tiny_world_model, tmp_path, "hypernet.nope=1")
    with pytest.raises(ConfigError, match="method 'photomaker' is not a registered method; available: .*e2e"):
        _cfg(tiny_world_model, tmp_path, "method=photomaker")
    with pytest.raises(ConfigError, match="unknown config key 'output_reg'"):  # λ lives in hypernet.output_reg now
        _cfg(tiny_world_model, tmp_path, "output_reg=0")
    image = tmp_path / "ref.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    code = main(["personalize", "--images", str(image), "--out", str(tmp_path / "x.safetensors"), "--hypernet", str(tmp_path), "--model", str(tiny_world_model)])
    assert code == 2 and "hypernet_config.json" in capsys.readouterr().err
    folder = tmp_path / "base_as_hypernet"
    shutil.copytree(tiny_world_model, folder)
    (folder / "hypernet_config.json").write_text('{"method": "hyperdreambooth"}')
    with pytest.raises(CheckpointError, match="holds a 'hyperdreambooth' personalizer, not 'e2e'"):
        E2EHyperNetwork.from_pretrained(folder)
    assert not (tmp_path / "x.safetensors").exists()


def test_two_processes_give_the_same_update_as_one(tiny_world_model, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` with global batch 4 = one process with batch 4."""
    args = [*TINY, f"base_model={tiny_world_model}", "optim.max_steps=1", "checkpoint_every=1"]
    one = train(load_train_config(None, [*args, f"out_dir={tmp_path / 'one'}"]))
    train_on_two_processes(args, tmp_path / "two")
    a = E2EHyperNetwork.from_pretrained(one).state_dict()
    b = E2EHyperNetwork.from_pretrained(tmp_path / "two" / "hypernet").state_dict()
    init = E2EHyperNetwork(E2EHyperNetwork.from_pretrained(one).config, E2EHyperNetwork.from_pretrained(one).target_shapes)
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5
    assert any(not torch.equal(a[k], init.state_dict()[k]) for k in a if k.startswith("head_B"))  # it did update


@dataclass
class ToyConfig:
    scale: float = 0.5
    noise: float = 0.0  # std of noise drawn from the global RNG inside the loss (as dropout would)

    def validate(self):
        if self.scale <= 0:
            raise ConfigError(f"hypernet.scale={self.scale} must be positive")


@methods.register
class ToyEngineMethod(methods.Personalizer):
    """A method of this test file only: one learned number per target layer scales a fixed rank-1 LoRA."""

    method = "toy-engine-test"
    config_class = ToyConfig

    def __init__(self, config, target_shapes):
        super().__init__(config, target_shapes)
        self.gain = torch.nn.Parameter(torch.full((len(self.target_shapes),), 0.01))

    def forward(self, references):
        n = references.shape[0]
        return LoRAWeights({name: LoRALayer(torch.ones(n, 1, d_in) * self.gain[i] * self.config.scale, torch.ones(n, d_out, 1) * 0.01, 1.0)
                            for i, (name, (d_in, d_out)) in enumerate(self.target_shapes.items())})

    def training_loss(self, batch, backbone):
        weights = self(batch.references)
        if self.config.noise:
            weights = weights.map(lambda l: LoRALayer(l.A + self.config.noise * torch.randn_like(l.A), l.B, l.alpha))
        with backbone.apply_lora(weights, mode="per_sample"):
            pred = backbone.denoise(batch.x_t, batch.t, batch.cond)
        loss = diffusion_loss(pred, batch.target, batch.loss_weights)
        return loss, {"gain_mean": self.gain.mean(), "dropped": torch.tensor(float(sum(p == "" for p in batch.prompts)))}


def test_any_registered_method_trains_and_logs_its_own_scalars(tiny_world_model, tmp_path):
    cfg = load_train_config(None, ["method=toy-engine-test", "hypernet.scale=2.0", f"base_model={tiny_world_model}", f"out_dir={tmp_path}",
                                   "optim.batch_size=4", "optim.max_steps=2", "optim.warmup_steps=1", "data.num_workers=0",
                                   "data.cond_dropout=0.5", "log_every=1"])
    assert isinstance(cfg.hypernet, ToyConfig) and cfg.hypernet.scale == 2.0
    with pytest.raises(ConfigError, match="hypernet.scale=0.0 must be positive"):
        load_train_config(None, ["method=toy-engine-test", "hypernet.scale=0"])
    folder = train(cfg)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "gain_mean", "dropped", "lr", "samples_per_s", "elapsed_s"]
    assert float(rows[0]["gain_mean"]) == pytest.approx(0.01) and float(rows[1]["gain_mean"]) != pytest.approx(0.01)
    assert 0 <= float(rows[0]["dropped"]) <= 4
    loaded = methods.load(folder)
    assert type(loaded) is ToyEngineMethod and loaded.config.scale == 2.0
    assert json.loads((folder / CONFIG_NAME).read_text())["train_config"]["method"] == "toy-engine-test"
    assert load_train_config(tmp_path / "config.yaml") == cfg  # the resolved config, saved beside the run


def test_resume_is_exact_for_a_method_that_draws_from_the_global_rng(tiny_world_model, tmp_path):
    """A method's own random draws (dropout, noise) in its loss come from the global RNG, seeded per step: a resumed
    run repeats them."""
    args = ["method=toy-engine-test", "hypernet.noise=0.5", f"base_model={tiny_world_model}", "optim.batch_size=2", "optim.max_steps=3",
            "optim.warmup_steps=1", "optim.lr=0.1", "data.num_workers=0", "log_every=1", "checkpoint_every=1"]
    full = train(load_train_config(None, [*args, f"out_dir={tmp_path / 'full'}"]))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "hypernet")
    shutil.rmtree(part / "checkpoints" / "step-0000003")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    torch.manual_seed(12345)  # whatever the global RNG holds when the resumed run starts
    resumed = train(load_train_config(None, [*args, f"out_dir={part}"]), resume=True)
    assert torch.equal(methods.load(full).gain, methods.load(resumed).gain)
    assert _losses(part)[3] == _losses(tmp_path / "full")[3]
