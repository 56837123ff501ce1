"""The training engine on a tiny Stable Diffusion 1.5 pipeline with a tiny CLIP vision encoder, from photo folders:
3 steps, a checkpoint, an exact resume, the 2-process equivalence, gradient checkpointing, bf16, bad input."""

import csv
import json
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.cli import main
from hyperbooth.errors import CheckpointError
from hyperbooth.lora.inject import LoRAInjector, target_shapes
from hyperbooth.lora.weights import LoRALayer, LoRAWeights
from hyperbooth.methods import CONFIG_NAME, E2EHyperNetwork
from hyperbooth.tiny import tiny_unet
from hyperbooth.train.engine import load_train_config, train
from hyperbooth.train.grad_checkpoint import enable_gradient_checkpointing
from tests.train.conftest import train_on_two_processes

HYPERNET = "hypernet={d_model: 32, layers: 1, heads: 2, rank: 2}"


def _args(sd, clip, photos, *extra):
    return [HYPERNET, f"hypernet.encoder={clip}", f"base_model={sd}", "data.kind=dreambench", f"data.path={photos}", "data.k=2",
            "data.num_workers=0", "data.flip_p=0.5", "optim.batch_size=2", "optim.warmup_steps=1", "log_every=1", "checkpoint_every=2", *extra]


def _weights(folder):
    return E2EHyperNetwork.from_pretrained(folder).state_dict()


def test_three_steps_checkpoint_and_exact_resume(tiny_sd, tiny_clip, subject_folder, tmp_path):
    full = train(load_train_config(None, _args(tiny_sd, tiny_clip, subject_folder, "optim.max_steps=3", f"out_dir={tmp_path / 'full'}")))
    loaded = methods.load(full)
    assert type(loaded) is E2EHyperNetwork and loaded.config.encoder == str(tiny_clip)
    backbone = load_backbone(tiny_sd)
    loaded.check_backbone(backbone)  # built for the SD pipeline's UNet targets
    meta = json.loads((full / CONFIG_NAME).read_text())
    assert meta["backbone"] == "sd15" and meta["base_model"] == str(tiny_sd)
    assert meta["train_config"]["data"]["kind"] == "dreambench" and meta["train_config"]["hypernet"]["d_model"] == 32
    stored = load_file(str(full / "hypernet.safetensors"))
    assert stored and not any(k.startswith("encoder.") for k in stored)  # the frozen CLIP loads from its own folder
    with open(tmp_path / "full" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and list(rows[0])[:4] == ["step", "loss", "diffusion_loss", "reg"]
    assert all(float(r["loss"]) > 0 for r in rows)
    refs = torch.rand(1, 2, 3, 16, 16) * 2 - 1
    assert any(d.abs().sum() > 0 for d in loaded.personalize(refs, backbone).deltas().values())  # it learned a ΔW ≠ 0

    # interrupt after step 2: the run's own step-2 checkpoint, as a crash after it would leave it; then resume
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-0000003")
    shutil.rmtree(part / "hypernet")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    resumed = train(load_train_config(None, _args(tiny_sd, tiny_clip, subject_folder, "optim.max_steps=3", f"out_dir={part}")), resume=True)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_two_processes_give_the_same_update_as_one(tiny_sd, tiny_clip, subject_folder, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` with global batch 2 = one process with batch 2, on SD."""
    args = _args(tiny_sd, tiny_clip, subject_folder, "optim.max_steps=1", "checkpoint_every=1")
    one = train(load_train_config(None, [*args, f"out_dir={tmp_path / 'one'}"]))
    train_on_two_processes(args, tmp_path / "two")
    a, b = _weights(one), _weights(tmp_path / "two" / "hypernet")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("head_B"))  # it did update (head_B starts at zero)


def test_checkpointing_with_hooks_gives_the_gradients_of_no_checkpointing():
    """diffusers' own checkpoint function recomputes blocks after the LoRA's hooks are gone (torch refuses);
    checkpoint_with_hooks recomputes with them, and the gradients equal those of a run without checkpointing."""

    def grads(mode):
        unet = tiny_unet().requires_grad_(False)
        if mode == "diffusers":
            unet.enable_gradient_checkpointing()
        elif mode == "hooks":
            enable_gradient_checkpointing(unet)
        g = torch.Generator().manual_seed(0)
        factors = {n: (torch.randn(2, 2, i, generator=g, requires_grad=True), torch.randn(2, o, 2, generator=g, requires_grad=True))
                   for n, (i, o) in target_shapes(unet).items()}
        weights = LoRAWeights({n: LoRALayer(0.1 * A, 0.1 * B, 2.0) for n, (A, B) in factors.items()})
        x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
        with LoRAInjector(unet).apply(weights, mode="per_sample"):
            out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample
        out.pow(2).mean().backward()  # after the context: the hooks are removed, as in the engine
        return torch.cat([t.grad.flatten() for pair in factors.values() for t in pair])

    torch.testing.assert_close(grads("hooks"), grads("none"), rtol=1e-5, atol=1e-7)
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        grads("diffusers")


@pytest.fixture
def plain_run(tiny_sd, tiny_clip, subject_folder, tmp_path):
    """One fp32 step without checkpointing: the reference of the runs below."""
    args = _args(tiny_sd, tiny_clip, subject_folder, "optim.max_steps=1")
    return args, _weights(train(load_train_config(None, [*args, f"out_dir={tmp_path / 'plain'}"])))


def test_gradient_checkpointing_gives_the_same_update(tiny_sd, plain_run, tmp_path, monkeypatch):
    from hyperbooth.train import engine

    args, a = plain_run
    backbone = load_backbone(tiny_sd)
    during = []
    original = engine.enable_gradient_checkpointing
    monkeypatch.setattr(engine, "enable_gradient_checkpointing", lambda unet: (original(unet), during.append(unet.is_gradient_checkpointing)))
    checkpointed = train(load_train_config(None, [*args, "gradient_checkpointing=true", f"out_dir={tmp_path / 'ckpt'}"]), backbone=backbone)
    assert during == [True]  # the run checkpointed the UNet's blocks …
    assert not backbone.unet.is_gradient_checkpointing  # … and handed the caller's backbone back as it came
    b = _weights(checkpointed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("head_B"))


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; a test that changes it starts and ends fresh."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_mixed_precision_trains_close_to_fp32(plain_run, tmp_path, fresh_accelerator_state):
    args, a = plain_run
    half = train(load_train_config(None, [*args, "mixed_precision=bf16", f"out_dir={tmp_path / 'bf16'}"]))

    def first_loss(out):
        with open(out / "log.csv") as f:
            return float(next(csv.DictReader(f))["loss"])

    # the same batch through the bf16 backbone under autocast: the loss of step 1 (ΔW = 0 still) within bf16's precision
    assert first_loss(tmp_path / "bf16") == pytest.approx(first_loss(tmp_path / "plain"), rel=0.02)
    c = _weights(half)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in c.values())  # the trained weights stay fp32
    assert any(c[k].abs().sum() > 0 for k in c if k.startswith("head_B"))  # and they moved


def test_cli_bad_input_exits_2_and_writes_nothing(tiny_sd, tiny_clip, subject_folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", *_args(tiny_sd, tiny_clip, subject_folder, "optim.max_steps=1"), f"out_dir={out}"]
    assert main([*base, "method=photomaker"]) == 2
    err = capsys.readouterr().err
    assert "method 'photomaker' is not a registered method" in err and "e2e" in err
    assert main([*base, "method=dreambooth-lora"]) == 2
    assert "hyperbooth finetune" in capsys.readouterr().err
    (subject_folder / "red_toy" / "99.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(base) == 2
    assert "99.png" in capsys.readouterr().err
    assert main([*base, f"base_model={tmp_path}"]) == 2  # neither the world's model nor a diffusers pipeline
    assert "model_index.json" in capsys.readouterr().err
    assert not out.exists()


def test_a_hypernetwork_trained_for_sd_refuses_the_world(tiny_sd, tiny_clip, subject_folder, tmp_path, tiny_world_model):
    folder = train(load_train_config(None, _args(tiny_sd, tiny_clip, subject_folder, "optim.max_steps=1", f"out_dir={tmp_path}")))
    with pytest.raises(CheckpointError, match="built for another backbone"):
        methods.load(folder).check_backbone(load_backbone(tiny_world_model))
