"""FSDP2 in the training engine, on two CPU processes (gloo; tests/train/fsdp_on_cpu.py turns accelerate's FSDP on):
the sharded run gives the update of one process with the whole batch (EMA and gradient clipping included), its
checkpoints hold full tensors and resume exactly under FSDP and on one process, and HyperLoRA (a frozen encoder and a
buffer inside the sharded module) trains and saves."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from hyperbooth.errors import ConfigError
from hyperbooth.methods import WEIGHTS_NAME
from hyperbooth.train.sharding import check_distributed
from hyperbooth.train.engine import load_train_config, train
from tests.train.conftest import failure, launch_two_processes

DRIVER = [str(Path(__file__).resolve().parent / "fsdp_on_cpu.py")]
TINY = ["hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}", "optim.batch_size=4", "optim.warmup_steps=1",
        "data.num_workers=0", "log_every=1", "optim.grad_clip=0.05", "optim.ema_decay=0.5"]


def _fsdp(args: list[str], out: Path, resume: bool = False):
    result = launch_two_processes(["train", *args, f"out_dir={out}", *(["--resume"] if resume else [])], script=DRIVER)
    assert result.returncode == 0, failure(result)
    assert "on 2 processes (FSDP)" in result.stderr and "fsdp-check: every trained parameter is a DTensor shard" in result.stderr, result.stderr[-3000:]
    return out / "hypernet"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_gives_the_update_of_one_process_and_resumes_exactly(tiny_world_model, tmp_path):
    args = [*TINY, f"base_model={tiny_world_model}", "optim.max_steps=2", "checkpoint_every=1"]
    one = _weights(train(load_train_config(None, [*args, f"out_dir={tmp_path / 'one'}"])))
    sharded = _weights(_fsdp(args, tmp_path / "fsdp"))
    init = _weights(tmp_path / "fsdp" / "checkpoints" / "step-0000001" / "hypernet")
    assert _close(one, sharded) < 1e-5  # two steps with clipping (the global norm over shards) and EMA
    assert any(not torch.equal(sharded[k], init[k]) for k in sharded if k.startswith("head_B"))  # it did update
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step-0000002" / "state.pt", weights_only=True)
    assert state["optimizer_layout"] == "names" and all(not type(t).__name__ == "DTensor" for t in state["ema"]["shadow_params"])

    # the step-1 checkpoint resumed under FSDP, and on one process: both end where the uninterrupted run ended
    for name in ("resumed_fsdp", "resumed_one"):
        part = tmp_path / name
        shutil.copytree(tmp_path / "fsdp", part)
        shutil.rmtree(part / "checkpoints" / "step-0000002")
        (part / "checkpoints" / "latest").write_text("step-0000001")
    resumed = _weights(_fsdp(args, tmp_path / "resumed_fsdp", resume=True))
    assert _close(sharded, resumed) < 1e-6
    single = _weights(train(load_train_config(None, [*args, f"out_dir={tmp_path / 'resumed_one'}"]), resume=True))
    assert _close(sharded, single) < 1e-5


def test_hyperlora_trains_under_fsdp(tiny_world_model, tmp_path):
    args = ["method=hyperlora", "hypernet={rank: 2, num_basis: 4, d_model: 32, depth: 1, heads: 2, id_tokens: 2, stage: 1}",
            "optim.batch_size=4", "optim.warmup_steps=1", "data.num_workers=0", "optim.max_steps=1", f"base_model={tiny_world_model}"]
    one = _weights(train(load_train_config(None, [*args, f"out_dir={tmp_path / 'one'}"])))
    sharded = _weights(_fsdp(args, tmp_path / "fsdp"))
    assert int(sharded["stage_reached"]) == 1 and not any(k.startswith("encoder.") for k in sharded)  # the frozen encoder is not saved
    assert _close(one, sharded) < 1e-5


def test_bf16_under_fsdp_trains_like_bf16_on_one_process(tiny_world_model, tmp_path):
    """mixed_precision bf16: fp32 shards, the loss under autocast, fp32 gradient reduction — as on one process
    (accelerate's FSDP2 default would cast the batch, timesteps included, to bf16)."""
    args = [*TINY, f"base_model={tiny_world_model}", "optim.max_steps=2", "checkpoint_every=2", "mixed_precision=bf16"]
    single = subprocess.run([sys.executable, "-m", "hyperbooth", "train", *args, f"out_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # a fresh process: accelerate's state is per process
    assert single.returncode == 0, single.stderr[-3000:]
    one = _weights(tmp_path / "one" / "hypernet")
    sharded = _weights(_fsdp(args, tmp_path / "fsdp"))
    assert all(v.dtype == torch.float32 for v in sharded.values())
    assert _close(one, sharded) < 2e-3  # bf16 compute in another reduction order


def test_what_fsdp_cannot_run_is_refused(tiny_world_model, tmp_path):
    def fsdp(**plugin):
        settings = {"fsdp_version": 2, "auto_wrap_policy": None, "activation_checkpointing": False, "mixed_precision_policy": None, **plugin}
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**settings)))

    with pytest.raises(ConfigError, match="adamw8bit.*does not run on FSDP shards"):
        check_distributed(fsdp(), "adamw8bit")
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        check_distributed(fsdp(activation_checkpointing=True))
    # a checkpoint written on one process (its optimizer state keyed by position) is refused under FSDP, named,
    # and nothing in its folder changes
    out, args = tmp_path / "single", [*TINY, f"base_model={tiny_world_model}", "optim.max_steps=2", "checkpoint_every=1"]
    train(load_train_config(None, [*args, f"out_dir={out}"]))
    shutil.rmtree(out / "checkpoints" / "step-0000002")
    (out / "checkpoints" / "latest").write_text("step-0000001")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = launch_two_processes(["train", *args, f"out_dir={out}", "--resume"], script=DRIVER)
    assert result.returncode != 0 and "was written without FSDP" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
