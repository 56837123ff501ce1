"""``configs/accelerate/*.yaml``: each parses with accelerate's own config class, names a real distributed type, uses
only keys ``accelerate launch`` knows, goes through the launcher's own validation into its environment, and (FSDP,
DeepSpeed) builds accelerate's plugin from that environment; each header gives the launch command."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from types import SimpleNamespace

from hyperbooth.errors import ConfigError
from hyperbooth.train.sharding import check_distributed


def _engine_accepts(kind, plugin=None) -> bool:
    """What the training engine says to an accelerator of this kind (sharding.check_distributed): runs it or refuses."""
    try:
        check_distributed(SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=plugin)))
    except ConfigError:
        return False
    return True

FOLDER = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP, "deepspeed_zero2.yaml": DistributedType.DEEPSPEED}


def _launch_args(path: Path):
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "hyperbooth", "train", "--config", "configs/e2e_sdxl.yaml"])
    return _validate_launch_command(args)


def test_the_folder_holds_the_three_configs():
    assert sorted(p.name for p in FOLDER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parses_with_accelerates_config_class_and_known_keys(name):
    path = FOLDER / name
    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config.distributed_type, DistributedType) and config.distributed_type == EXPECTED[name]
    assert config.num_machines == 1 and config.num_processes > 1 and config.mixed_precision == "bf16"
    # nested keys are copied onto the launcher's arguments unchecked: each must be one of its options
    options = {action.dest for action in launch_command_parser()._actions}
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in options, key
    for key in config.deepspeed_config:
        assert key in options, key
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"accelerate launch --config_file configs/accelerate/{name} -m hyperbooth train --config configs/" in line for line in header)


def test_ddp_launches_as_multi_gpu():
    args, _, _ = _launch_args(FOLDER / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 8
    assert prepare_multi_gpu_env(args)["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert _engine_accepts(DistributedType.MULTI_GPU)  # the engine runs it


def test_fsdp_builds_accelerates_plugin(monkeypatch):
    args, _, _ = _launch_args(FOLDER / "fsdp.yaml")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.min_num_params == 1_000_000
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and not plugin.activation_checkpointing
    assert _engine_accepts(DistributedType.FSDP, plugin)  # the engine runs FSDP2 ...
    assert plugin.auto_wrap_policy is None  # ... with the personalizer as one unit (sharding's docstring says why)
    assert not _engine_accepts(DistributedType.FSDP, SimpleNamespace(fsdp_version=1, auto_wrap_policy=None))  # FSDP1 is refused


def test_deepspeed_zero2_builds_accelerates_plugin(monkeypatch):
    args, defaults, from_config = _launch_args(FOLDER / "deepspeed_zero2.yaml")
    assert args.use_deepspeed
    # what `accelerate launch` sets before its DeepSpeed launcher (launch_command)
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, *(["mixed_precision"] if from_config else [])])
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 2 and zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0 and plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert not _engine_accepts(DistributedType.DEEPSPEED)  # refused, named (the header says why)
