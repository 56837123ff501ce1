"""HyperDreamBooth's pre-optimization (several identities in one batch = separate runs; shards, resume, refusals) and
the hypernetwork trained on its targets by `hyperbooth train`, then used by `hyperbooth personalize`."""

import csv
import shutil

import pytest
import torch

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.cli import main
from hyperbooth.config import load_config
from hyperbooth.errors import CheckpointError
from hyperbooth.lora import load_lora
from hyperbooth.methods.hyperdreambooth import HyperDreamBooth, LiDBTargets
from hyperbooth.train.engine import load_train_config, train
from hyperbooth.train.preoptimize import PreoptConfig, optimize_shard
from hyperbooth.world.datasets import bank_identities

LIDB = ["rank=1", "a=8", "b=6"]
HYPERNET = "hypernet={rank: 1, a: 8, b: 6, d_model: 32, layers: 1, heads: 2, iterations: 2}"


def _preopt_args(model, out, *extra):
    return [*LIDB, f"base_model={model}", f"out_dir={out}", "identities=3", "shard_size=2", "steps=2", "pool=2", "log_every=1", *extra]


def test_identities_in_one_batch_are_optimized_as_in_separate_runs(tiny_world_model):
    backbone = load_backbone(tiny_world_model)
    cfg = load_config(PreoptConfig, None, [*LIDB, "steps=3", "pool=3"])
    seeds = bank_identities(2)
    together, _ = optimize_shard(backbone, seeds, cfg)
    alone = [optimize_shard(backbone, [s], cfg)[0] for s in seeds]
    for name, (A, B) in together.items():
        for row in range(2):
            torch.testing.assert_close(A[row], alone[row][name][0][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(B[row], alone[row][name][1][0], atol=1e-5, rtol=1e-4)
        assert B.abs().sum() > 0  # B_train left zero: something was optimized


def test_a_resumed_shard_continues_exactly(tiny_world_model, tmp_path):
    backbone = load_backbone(tiny_world_model)
    cfg = load_config(PreoptConfig, None, [*LIDB, "steps=3", "pool=2", "checkpoint_every=1"])
    seeds = bank_identities(2)
    full, _ = optimize_shard(backbone, seeds, cfg, checkpoint_dir=tmp_path / "a")
    # the run's checkpoint at step 2, as a kill during step 3 leaves it; the resumed run does step 3 only
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step-0000002"
    resumed, _ = optimize_shard(backbone, seeds, cfg, checkpoint_dir=tmp_path / "a", resume=True)
    for name in full:
        assert torch.equal(full[name][0], resumed[name][0]) and torch.equal(full[name][1], resumed[name][1])
    with pytest.raises(CheckpointError, match="other identities"):
        optimize_shard(backbone, seeds[::-1], cfg, checkpoint_dir=tmp_path / "a", resume=True)


def test_preoptimize_then_train_then_personalize(tiny_world_model, tmp_path, capsys):
    out = tmp_path / "preopt"
    assert main(["preoptimize", *_preopt_args(tiny_world_model, out)]) == 0
    shards = sorted(out.glob("lidb-*.safetensors"))
    assert [p.name for p in shards] == ["lidb-00000.safetensors", "lidb-00001.safetensors"]  # 3 identities in shards of 2
    with open(out / "log.csv") as f:
        assert [(r["shard"], r["step"]) for r in csv.DictReader(f)] == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    before = {p.name: p.read_bytes() for p in shards}
    assert main(["preoptimize", *_preopt_args(tiny_world_model, out)]) == 2  # refused: nothing overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["preoptimize", "--resume", *_preopt_args(tiny_world_model, out)]) == 0  # finished shards are kept
    assert {p.name: p.read_bytes() for p in sorted(out.glob("lidb-*.safetensors"))} == before

    backbone = load_backbone(tiny_world_model)
    targets = LiDBTargets(out, 1, 8, 6, 0, backbone.target_shapes())
    assert len(targets) == 3 and set(targets.row) == set(bank_identities(3))

    common = [HYPERNET, f"hypernet.targets_path={out}", f"base_model={tiny_world_model}", "method=hyperdreambooth", "data.identities=3",
              "data.num_workers=0", "optim.batch_size=4", "optim.warmup_steps=1", "log_every=1", "optim.max_steps=2"]
    hypernet = train(load_train_config(None, [*common, f"out_dir={tmp_path / 'run'}"]))
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"diffusion_loss", "weight_loss"} <= set(rows[0]) and float(rows[0]["weight_loss"]) > 0
    net = methods.load(hypernet)
    assert type(net) is HyperDreamBooth and net.config.iterations == 2
    # the first estimate started at the mean of the targets (then moved by 2 steps of lr 3e-4 at most a little)
    mean = net.target_theta(torch.arange(3))
    assert all(torch.allclose(net.theta0[g], v.mean(0), atol=5e-3) for g, v in mean.items())

    # weight loss only: no pass through the UNet; diffusion loss only: no targets needed
    train(load_train_config(None, [*common, "hypernet.diffusion_loss=0", f"out_dir={tmp_path / 'w'}"]))
    train(load_train_config(None, [*common, "hypernet.weight_loss=0", "hypernet.targets_path=", f"out_dir={tmp_path / 'd'}"]))

    # targets for other layers are refused, naming the shard
    with pytest.raises(CheckpointError, match="other target layers"):
        train(load_train_config(None, [*common, "hypernet.targets=[to_q]", f"out_dir={tmp_path / 'x'}"]))

    image = tmp_path / "ref.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    lora = tmp_path / "subject.safetensors"
    args = ["personalize", "--images", str(image), "--hypernet", str(hypernet), "--model", str(tiny_world_model), "--out", str(lora)]
    assert main([*args, "--iterations", "4", "--fast-finetune-steps", "2", "--class-name", "ball"]) == 0
    loaded = load_lora(lora, backbone.unet)
    assert set(loaded.unet.ranks.values()) == {1 + 4}  # rank r + r' (the fast fine-tune's default r' = 4)
    assert "hyperdreambooth" in capsys.readouterr().out
    shutil.copy(lora, tmp_path / "kept.safetensors")
    for bad, message in ((["--fast-finetune-steps", "-1", "--class-name", "ball"], "fast_finetune_steps=-1"), (["--iterations", "0"], "iterations=0"),
                         (["--fast-finetune-steps", "2"], "class name"), (["--method", "e2e"], "holds a 'hyperdreambooth' personalizer")):
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
        assert lora.read_bytes() == (tmp_path / "kept.safetensors").read_bytes()  # nothing already written is lost


def test_preoptimize_a_photo_folder_and_train_on_it(tiny_world_model, tmp_path):
    from tests.train.conftest import write_photo

    photos = tmp_path / "faces"
    for i, color in enumerate(((220, 30, 30), (30, 200, 30), (30, 30, 220))):
        write_photo(photos / f"{i:03d}.png", color, shift=i, size=32)
    out = tmp_path / "preopt"
    assert main(["preoptimize", *_preopt_args(tiny_world_model, out, f"data_path={photos}", "class_name=person")]) == 0
    backbone = load_backbone(tiny_world_model)
    targets = LiDBTargets(out, 1, 8, 6, 0, backbone.target_shapes())
    assert sorted(targets.row) == [0, 1, 2]  # each photo is one identity, keyed by its index
    hypernet = train(load_train_config(None, [HYPERNET, f"hypernet.targets_path={out}", f"base_model={tiny_world_model}", "method=hyperdreambooth",
                                              "data.kind=folder", f"data.path={photos}", "data.class_name=person", "data.num_workers=0",
                                              "optim.batch_size=3", "optim.max_steps=1", "log_every=1", f"out_dir={tmp_path / 'run'}"]))
    with open(tmp_path / "run" / "log.csv") as f:
        assert float(next(csv.DictReader(f))["weight_loss"]) > 0
    assert type(methods.load(hypernet)) is HyperDreamBooth
    assert main(["preoptimize", *_preopt_args(tiny_world_model, tmp_path / "p2", f"data_path={photos}", "class_name=person", "identities=4")]) == 2


def test_training_data_must_be_the_pre_optimized_identities(tiny_world_model, tmp_path, subject_folder):
    from hyperbooth.errors import ConfigError
    from hyperbooth.personalize import parse_options

    out = tmp_path / "preopt"
    assert main(["preoptimize", *_preopt_args(tiny_world_model, out, "steps=1")]) == 0
    common = [HYPERNET, f"hypernet.targets_path={out}", f"base_model={tiny_world_model}", "method=hyperdreambooth", "data.num_workers=0",
              "optim.batch_size=2", "optim.max_steps=1", f"out_dir={tmp_path / 'run'}"]
    for extra, error, message in (
        (["data.identities=0"], ConfigError, "needs data.identities"),  # else the weight loss would be silently zero
        (["data.identities=4"], CheckpointError, "has no pre-optimized target"),  # a bank larger than the targets
        (["data.identities=3", "hypernet.diffusion_loss=0", "data.bank_fraction=0.5"], ConfigError, "bank_fraction=1"),
        (["data.kind=dreambench", f"data.path={subject_folder}"], ConfigError, "not for data.kind='dreambench'"),
    ):
        with pytest.raises(error, match=message):
            train(load_train_config(None, [*common, *extra]))
        assert not (tmp_path / "run" / "hypernet").exists()
    next(out.glob("lidb-*.safetensors")).unlink()  # an unfinished pre-optimization is refused, not half used
    with pytest.raises(CheckpointError, match=r"unfinished \(1 of 2 shards\)"):
        train(load_train_config(None, [*common, "data.identities=3"]))
    assert parse_options("fast_finetune_lr=1e-3,iterations=2") == {"fast_finetune_lr": 1e-3, "iterations": 2}
    with pytest.raises(ConfigError, match="learnable_bases"):
        load_train_config(None, [*common, "hypernet.learnable_bases=true"]).hypernet.validate()


def test_a_checkpoint_from_before_new_settings_still_resumes(tiny_world_model, tmp_path):
    """Settings added after a checkpoint was written (here the identity bank's) take their defaults on --resume."""
    args = ["hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}", f"base_model={tiny_world_model}", "data.num_workers=0",
            "optim.batch_size=2", "checkpoint_every=1", "log_every=1", f"out_dir={tmp_path}"]
    train(load_train_config(None, [*args, "optim.max_steps=2"]))
    shutil.rmtree(tmp_path / "hypernet")  # as a run killed during step 2 leaves it, its checkpoint from an older version
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000002")
    (tmp_path / "checkpoints" / "latest").write_text("step-0000001")
    state_path = tmp_path / "checkpoints" / "step-0000001" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    for key in ("identities", "identity_start", "bank_fraction"):
        del state["config"]["data"][key]
    torch.save(state, state_path)
    (state_path.parent / "manifest.json").unlink()  # older versions wrote no manifest
    train(load_train_config(None, [*args, "optim.max_steps=2"]), resume=True)
    with open(tmp_path / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
