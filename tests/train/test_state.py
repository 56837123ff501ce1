import math
import shutil

import pytest
import torch

from hyperbooth.errors import CheckpointError
from hyperbooth.train.ema import build_ema, load_ema
from hyperbooth.train.optim import OptimConfig, build_optimizer, cosine_schedule, warmup_cosine
from hyperbooth.train.state import latest_checkpoint, load_state, save_state, write_checkpoint


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, min_ratio=0.1) == pytest.approx(0.1)  # the floor holds past the end
    assert warmup_cosine(55, 10, 100, min_ratio=0.0) == pytest.approx(0.5)


def test_plain_cosine_is_the_oracles_schedule_bit_for_bit():
    """warmup 0, floor 0: exactly the cosine the oracle and encoder pre-training were trained with."""
    for steps in (7, 600, 2000):
        for s in range(steps + 3):
            assert warmup_cosine(s, 0, steps, 0.0) == 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def test_schedule_drives_the_optimizers_lr():
    model = torch.nn.Linear(2, 2)
    optimizer, schedule = build_optimizer(model.parameters(), OptimConfig(lr=1.0, warmup_steps=2, max_steps=6, min_lr_ratio=0.1))
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # decays after the warm-up
    plain = cosine_schedule(torch.optim.SGD(model.parameters(), lr=2.0), warmup=0, total=4, min_ratio=0.0)
    assert plain.get_last_lr() == [2.0]


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, lambda f, s=step: save_state(f / "state.pt", {"step": s}), keep=2)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-0000003" and load_state(latest / "state.pt")["step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]

    def crash(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, 4, crash)
    assert latest_checkpoint(tmp_path).name == "step-0000003"  # the interrupted write never became "latest"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_state_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt"):
        load_state(tmp_path / "state.pt")


def test_ema_tracks_restores_and_resumes_exactly_from_a_weights_only_state(tmp_path):
    assert build_ema(torch.nn.Linear(2, 2).parameters(), 0.0) is None  # decay 0: no EMA
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    start = model.weight.detach().clone()
    ema = build_ema(model.parameters(), decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.step(model.parameters())  # the first update copies (diffusers' warm-up: d_1 = 0)
    torch.testing.assert_close(ema.shadow_params[0], torch.ones(2, 2))
    assert not torch.equal(start, torch.ones(2, 2))

    def run(ema, first, last):
        for k in range(first, last):
            with torch.no_grad():
                model.weight.fill_(float(k))
            ema.step(model.parameters())

    run(ema, 2, 5)
    save_state(tmp_path / "state.pt", {"ema": ema.state_dict()})  # read back with weights_only=True
    resumed = build_ema(model.parameters(), decay=0.5)
    load_ema(resumed, load_state(tmp_path / "state.pt")["ema"], "cpu")
    run(ema, 5, 9)
    run(resumed, 5, 9)
    assert resumed.optimization_step == ema.optimization_step == 8
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, resumed.shadow_params))
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target.parameters())
    assert 5.0 < target.weight[0, 0].item() < 8.0  # an average of the recent values, behind the last one


def test_a_damaged_checkpoint_is_named_and_the_one_before_resumed(tiny_world_model, tmp_path, caplog):
    """Truncated or bit-flipped files of the newest checkpoint: --resume says so and continues from the previous
    checkpoint, exactly (the losses after it equal the uninterrupted run's)."""
    import csv
    import logging

    from hyperbooth.errors import CheckpointError
    from hyperbooth.train.engine import load_train_config, train

    args = ["hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}", f"base_model={tiny_world_model}", "data.num_workers=0",
            "optim.batch_size=2", "optim.max_steps=3", "checkpoint_every=1", "log_every=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_train_config(None, [*args, f"out_dir={full}"]))
    shutil.copytree(full, part)
    shutil.rmtree(part / "hypernet")
    ckpt = part / "checkpoints"
    weights = ckpt / "step-0000003" / "hypernet" / "hypernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight: safetensors itself would not notice
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="hyperbooth"):
        train(load_train_config(None, [*args, f"out_dir={part}"]), resume=True)
    assert "step-0000003 is damaged (hypernet/hypernet.safetensors differs" in caplog.text and "resuming from" in caplog.text
    losses = lambda out: {int(r["step"]): r["loss"] for r in csv.DictReader(open(out / "log.csv"))}  # noqa: E731
    assert losses(part) == losses(full)  # step 3 done again from step 2, bit for bit
    for step in ("step-0000002", "step-0000003"):  # every checkpoint truncated: a clear error, nothing resumed
        state = ckpt / step / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no usable checkpoint.*state.pt differs"):
        train(load_train_config(None, [*args, f"out_dir={part}"]), resume=True)


def test_a_checkpoint_being_written_when_killed_is_never_resumed(tmp_path):
    """A kill during a checkpoint write leaves its temporary folder: --resume takes the last complete one."""
    from hyperbooth.train.state import resume_checkpoint

    write_checkpoint(tmp_path, 2, lambda folder: (folder / "state.pt").write_bytes(b"complete"))
    (tmp_path / "checkpoints" / ".step-0000004.tmp").mkdir()  # what the kill left: never renamed, never pointed at
    (tmp_path / "checkpoints" / ".step-0000004.tmp" / "state.pt").write_bytes(b"half")
    assert resume_checkpoint(tmp_path, True).name == "step-0000002"
