"""Training killed with SIGKILL mid-run, then ``--resume``: the steps after the checkpoint give the uninterrupted run's
losses bit for bit, and the CSV log holds every step once — for ``train`` (e2e, HyperLoRA, HyperDreamBooth),
``train-base`` and HyperDreamBooth's ``preoptimize`` (its shard files equal the uninterrupted run's). About 30 s
each (three subprocess runs): e2e runs with ``make test``, the others with ``make test-slow``."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_UNET

TINY_HYPERNETS = {
    "e2e": "hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}",
    "hyperlora": "hypernet={rank: 2, num_basis: 4, d_model: 32, depth: 1, heads: 2, id_tokens: 2, stage: 1}",
    "hyperdreambooth": "hypernet={rank: 1, a: 8, b: 6, d_model: 32, layers: 1, heads: 2, iterations: 2, encoder: world, encoder_dim: 16, weight_loss: 0}",
}


def _run(args: list[str], kill_when=None) -> bool:
    """``hyperbooth *args`` in a subprocess (one thread); with ``kill_when(): bool``, SIGKILL it as soon as that holds.
    Returns whether it was killed before finishing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hyperbooth", "--log-level", "WARNING", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_when is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return False
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if kill_when():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return False


def _checkpoint_at_least(out: Path, step: int):
    pointer = out / "checkpoints" / "latest"
    return lambda: pointer.is_file() and int(pointer.read_text().strip().split("-")[-1]) >= step


def _log(out: Path) -> list[tuple[int, str]]:
    with open(out / "log.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "e2e" else pytest.mark.slow) for m in sorted(TINY_HYPERNETS)])
def test_train_killed_and_resumed_continues_exactly(method, tiny_world_model, tmp_path):
    args = ["train", f"method={method}", TINY_HYPERNETS[method], f"base_model={tiny_world_model}", "data.num_workers=0", "optim.batch_size=2",
            "optim.max_steps=12", "checkpoint_every=2", "log_every=1"]
    _run([*args, f"out_dir={tmp_path / 'full'}"])
    killed = _run([*args, f"out_dir={tmp_path / 'part'}"], kill_when=_checkpoint_at_least(tmp_path / "part", 4))
    assert killed, "the run finished before the kill: make it longer"
    _run([*args, f"out_dir={tmp_path / 'part'}", "--resume"])
    assert _log(tmp_path / "part") == _log(tmp_path / "full")  # every step once, each loss bit for bit
    assert (tmp_path / "part" / "hypernet" / "hypernet.safetensors").read_bytes() == (tmp_path / "full" / "hypernet" / "hypernet.safetensors").read_bytes()


@pytest.mark.slow
def test_train_base_killed_and_resumed_continues_exactly(tmp_path):
    args = ["train-base", TINY_UNET, "optim.max_steps=12", "optim.batch_size=2", "data.num_workers=0", "checkpoint_every=2", "log_every=1"]
    _run([*args, f"out_dir={tmp_path / 'full'}"])
    assert _run([*args, f"out_dir={tmp_path / 'part'}"], kill_when=_checkpoint_at_least(tmp_path / "part", 4))
    _run([*args, f"out_dir={tmp_path / 'part'}", "--resume"])
    assert _log(tmp_path / "part") == _log(tmp_path / "full")


@pytest.mark.slow
def test_preoptimize_killed_and_resumed_writes_the_same_shards(tiny_world_model, tmp_path):
    args = ["preoptimize", "rank=1", "a=8", "b=6", f"base_model={tiny_world_model}", "identities=4", "shard_size=2", "steps=12", "pool=2",
            "checkpoint_every=2", "log_every=1", "device=cpu"]
    _run([*args, f"out_dir={tmp_path / 'full'}"])
    part = tmp_path / "part"
    shard_ckpt = part / ".shard-00001" / "checkpoints" / "latest"  # killed inside the second shard, after a checkpoint
    killed = _run([*args, f"out_dir={part}"], kill_when=lambda: shard_ckpt.is_file() and int(shard_ckpt.read_text().split("-")[-1]) >= 4)
    assert killed
    _run([*args, f"out_dir={part}", "--resume"])
    for name in ("lidb-00000.safetensors", "lidb-00001.safetensors"):
        full, resumed = (tmp_path / "full" / name).read_bytes(), (part / name).read_bytes()
        assert _tensors(full) == _tensors(resumed)
    rows = lambda out: [(r["shard"], r["step"], r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]  # noqa: E731
    assert rows(part) == rows(tmp_path / "full")


def _tensors(data: bytes) -> dict:
    """The tensors of a safetensors file's bytes (its header's timing metadata differs between runs)."""
    from safetensors.torch import load

    return {k: v.numpy().tobytes() for k, v in load(data).items()}
