"""FSDP2 in the training engine: the trained hypernetwork (and its frozen image encoder) sharded across processes by
accelerate (``accelerate launch --config_file configs/accelerate/fsdp.yaml``), with checkpoints, the final folder and
the EMA gathered to full tensors and loaded back into shards.

Under FSDP every process holds ``1/N`` of each parameter (a ``DTensor`` shard), of its gradient, of its AdamW moments
and of its EMA shadow. Whatever the engine writes is gathered first — a collective, so every process calls these
functions, and only the main process writes:

- weights: torch's ``get_model_state_dict`` with ``full_state_dict`` (what ``accelerator.get_state_dict`` does for
  FSDP2; full tensors on the main process);
- optimizer: torch's ``get_optimizer_state_dict`` with ``full_state_dict`` (keyed by parameter names, so the
  checkpoint resumes on any number of processes, sharded or not) and ``set_optimizer_state_dict`` back;
- EMA shadows: each ``DTensor.full_tensor()``; loading redistributes them with the parameters' placements.

The engine wraps the personalizer as one FSDP unit (``fully_shard`` on the root only): methods read their
parameters outside submodule ``forward`` calls (basis tensors, heads applied by index), which a per-block wrap would
leave sharded. Mixed precision is the same as under DDP: fp32 parameters, gradients reduced in fp32, the loss under
autocast (the engine's, :func:`autocast`); accelerate's FSDP2 default (bf16 parameters, inputs cast to bf16, bf16
gradient reduction) would cast the whole training batch, timesteps included. Every process builds the personalizer
from the same seed, so the shards they keep are of the same weights (FSDP2 broadcasts nothing at prepare). The
frozen backbone sits outside the prepared module and is never sharded (configs/accelerate/fsdp.yaml says what that
means for memory). DeepSpeed is refused: its engine replaces the optimizer and the module the
personalizer's loss runs through, and it cannot be run on this project's CPU test machines.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import DistributedType

from hyperbooth.errors import ConfigError

log = logging.getLogger(__name__)

#: the ``optimizer_layout`` of a checkpoint's state whose optimizer state is keyed by parameter names
NAMED_LAYOUT = "names"


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed(accelerator, optimizer: str = "adamw") -> None:
    """Refuse what the engine cannot run (DeepSpeed; FSDP version 1; FSDP's own activation checkpointing; 8-bit AdamW
    on shards) and set FSDP2 to wrap the personalizer as one unit in fp32 (see the module docstring)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError("hyperbooth train runs data parallel (configs/accelerate/ddp.yaml) or FSDP2 (configs/accelerate/fsdp.yaml), not "
                          "DEEPSPEED: DeepSpeed's engine replaces the optimizer and the module the personalizer's loss runs through")
    if kind != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ConfigError(f"hyperbooth train shards with FSDP2: set fsdp_version: 2 in the accelerate config (it has {getattr(plugin, 'fsdp_version', 1)})")
    if getattr(plugin, "activation_checkpointing", False):
        raise ConfigError("fsdp_activation_checkpointing: true is not used by hyperbooth train (the personalizer is one FSDP unit); "
                          "set it to false and checkpoint the backbone with gradient_checkpointing: true")
    if optimizer == "adamw8bit":
        raise ConfigError("optim.optimizer='adamw8bit' does not run on FSDP shards (its block-quantised state does not follow "
                          "them); use optim.optimizer='adamw' under FSDP, or adamw8bit with DDP (configs/accelerate/ddp.yaml)")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if plugin.auto_wrap_policy is not None:
        log.info("FSDP2: the personalizer is sharded as one unit (the config's auto_wrap_policy is not used)")
    plugin.auto_wrap_policy = None
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, output_dtype=None, cast_forward_inputs=False)


def autocast(accelerator):
    """The loss's mixed-precision context: under FSDP the engine's own autocast (accelerate applies it to a prepared
    module under DDP and a single process, not under FSDP2); elsewhere nothing (accelerate's is already there)."""
    import contextlib

    if not is_sharded(accelerator) or accelerator.mixed_precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16)


def full_model_state(accelerator, objective) -> dict[str, torch.Tensor]:
    """The personalizer's full state dict (names without the ``personalizer.`` prefix of the engine's objective);
    gathered when sharded (call it on every process; the main process gets the tensors)."""
    if is_sharded(accelerator):  # what accelerator.get_state_dict does for FSDP2
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(accelerator.unwrap_model(objective), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.unwrap_model(objective).state_dict()
    prefix = "personalizer."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def optimizer_state(accelerator, objective, optimizer) -> tuple[dict, str | None]:
    """``(state, layout)``: the optimizer's own ``state_dict()`` unsharded (layout None), or under FSDP the full state
    keyed by parameter names (layout :data:`NAMED_LAYOUT`; a collective)."""
    if not is_sharded(accelerator):
        return optimizer.state_dict(), None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(accelerator.unwrap_model(objective), inner, options=options), NAMED_LAYOUT


def load_optimizer_state(accelerator, objective, optimizer, state: dict, layout: str | None, source: str) -> None:
    """Restore what :func:`optimizer_state` saved, into shards when sharded. A checkpoint written unsharded cannot be
    resumed under FSDP (its state is keyed by position in the optimizer, not by name): named as such."""
    if layout is None:
        if is_sharded(accelerator):
            raise ConfigError(f"--resume: {source} was written without FSDP; resume it with the launch that wrote it "
                              "(its optimizer state is not keyed by parameter name)")
        optimizer.load_state_dict(state)
        return
    if layout != NAMED_LAYOUT:
        raise ConfigError(f"--resume: {source} has an optimizer state of unknown layout {layout!r}")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(accelerator.unwrap_model(objective), inner, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def ema_state(ema) -> dict | None:
    """The EMA's ``state_dict`` with its shadows as full tensors (a collective when they are shards)."""
    if ema is None:
        return None
    state = ema.state_dict()
    state["shadow_params"] = [_full(p).detach().cpu() for p in state["shadow_params"]]
    return state


def load_ema_state(ema, state: dict, params: list[torch.nn.Parameter], device) -> None:
    """Restore :func:`ema_state` into an EMA over ``params``: each full shadow cut to its parameter's placement."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    shadows = []
    if len(state["shadow_params"]) != len(params):
        raise ConfigError(f"--resume: the checkpoint's EMA holds {len(state['shadow_params'])} tensors for {len(params)} trained parameters")
    for shadow, p in zip(state["shadow_params"], params):
        shadow = shadow.to(device=device, dtype=p.dtype)
        shadows.append(distribute_tensor(shadow, p.device_mesh, p.placements) if isinstance(p, DTensor) else shadow)
    ema.load_state_dict({**state, "shadow_params": shadows})
