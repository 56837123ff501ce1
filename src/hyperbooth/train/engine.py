"""The training engine (``hyperbooth train``): any registered trainable method on any backbone.

Reads top to bottom: config (``method`` picks the class from the registry, ``hypernet`` is that method's own config)
→ the frozen backbone (:func:`~hyperbooth.backbones.load_backbone`), the dataset (:mod:`hyperbooth.train.data`),
the method's personalizer for that backbone → loop:

    batch → x0 = backbone.to_model(target) → ε, t, condition dropout from each sample's own generator
          → x_t = scheduler.add_noise(x0, ε, t), the prediction target, Min-SNR weights (:mod:`hyperbooth.diffusion`)
          → cond = backbone.encode_prompts(prompts) → TrainBatch → personalizer.training_loss(batch, backbone)
          → AdamW on the personalizer's trainable parameters → warm-up + cosine lr → EMA

→ atomic checkpoints → ``save_pretrained`` (the resolved training config and the backbone recorded in it).

accelerate handles devices, mixed precision, data parallelism (``accelerate launch -m hyperbooth train …``) and
FSDP2 sharding of the personalizer (:mod:`hyperbooth.train.sharding`: checkpoints gathered from the shards).
Every random draw of a sample (its data, noise, timestep, condition dropout) is a function of its *global* index,
so the same global batch gives the same update on one process or several, and ``--resume`` continues exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from hyperbooth import methods
from hyperbooth.backbones import Backbone, load_backbone
from hyperbooth.config import config_from_dict, load_config, save_config, to_dict
from hyperbooth.diffusion import DEFAULT_MIN_SNR_GAMMA, check_min_snr, forward_process, loss_weights, training_scheduler, training_timesteps
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.methods.base import WEIGHTS_NAME, Personalizer, TrainBatch
from hyperbooth.train.data import DataConfig, batches, build_dataset
from hyperbooth.train import sharding
from hyperbooth.train.ema import build_ema
from hyperbooth.train.grad_checkpoint import enable_gradient_checkpointing
from hyperbooth.train.optim import OptimConfig, build_optimizer, optimizer_class
from hyperbooth.train.state import load_state, resume_checkpoint, save_state, training_state, trim_log, write_checkpoint

#: ``save_dtype`` → the dtype of the final folder's weights (None: the parameters' own, fp32)
SAVE_DTYPES = {"fp32": None, "fp16": torch.float16}
#: ``mixed_precision`` → the dtype the frozen backbone is loaded in (its weights are never trained)
BACKBONE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}
#: recorded as ``base_model`` when the run used the shipped world model
SHIPPED_WORLD_NAME = "hyperbooth:world/base"

log = logging.getLogger(__name__)


@dataclass
class TrainOptimConfig(OptimConfig):
    """The shared optimizer settings with the hypernetwork's defaults (``batch_size`` is the global batch)."""

    lr: float = 3e-4
    max_steps: int = 4000
    ema_decay: float = 0.0  # 0 turns EMA off


@dataclass
class TrainConfig:
    method: str = "e2e"  # a registered trainable method (hyperbooth.methods.METHODS)
    base_model: str = ""  # backbone: a diffusers pipeline folder or hub id, the world's model folder; empty = the shipped world model
    out_dir: str = "runs/hyper"
    init_from: str = ""  # a saved personalizer folder of the same method and shapes whose weights start the run; "" = fresh
    hypernet: dict = field(default_factory=dict)  # the method's own config (its config_class); typed by load_train_config
    data: DataConfig = field(default_factory=DataConfig)
    optim: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    min_snr_gamma: float = DEFAULT_MIN_SNR_GAMMA  # Min-SNR-γ loss weighting; 0 turns it off
    seed: int = 0
    mixed_precision: str = "no"  # "no" or "bf16" (autocast; the frozen backbone is then loaded in bf16)
    gradient_checkpointing: bool = False  # recompute the UNet's blocks in the backward pass (less memory, ~1.3x time)
    checkpoint_every: int = 250
    log_every: int = 25
    save_dtype: str = "fp32"  # dtype of the final ``hypernet`` folder's weights: "fp32" or "fp16" (half the file)

    def validate(self) -> None:
        if self.mixed_precision not in BACKBONE_DTYPES:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} must be one of {', '.join(map(repr, BACKBONE_DTYPES))}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_dtype={self.save_dtype!r} must be one of {', '.join(map(repr, SAVE_DTYPES))}")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"min_snr_gamma={self.min_snr_gamma} must be >= 0 (0 turns the weighting off)")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every and log_every must be at least 1")


# -- config -------------------------------------------------------------------------------------------------------


def init_personalizer(personalizer: Personalizer, folder: str) -> None:
    """Start from the weights of the personalizer saved in ``folder`` (same method, same parameter names and shapes:
    e.g. a shipped hypernetwork fine-tuned further, on a continued base model or new data); the first mismatch is
    named."""
    source = methods.load(folder)
    if source.method != personalizer.method:
        raise ConfigError(f"init_from={folder!r} holds a {source.method!r} personalizer, this run trains {personalizer.method!r}")
    own, theirs = personalizer.state_dict(), source.state_dict()
    for key in sorted(set(own) | set(theirs)):
        if key not in own or key not in theirs or own[key].shape != theirs[key].shape:
            what = f"{tuple(theirs[key].shape)} vs {tuple(own[key].shape)}" if key in own and key in theirs else ("missing there" if key in own else "not in this run")
            raise ConfigError(f"init_from={folder!r} does not fit this run's {personalizer.method} config: {key!r} ({what})")
    personalizer.load_state_dict({k: v.to(own[k].dtype) for k, v in theirs.items()})
    log.info("initialised the %s personalizer from %s", personalizer.method, folder)


def trainable_method(name: str, source: str = "config") -> type[Personalizer]:
    """The registered class ``name`` names, if ``hyperbooth train`` can train it; a clear ConfigError otherwise."""
    cls = methods.get(name, what=f"{source}: method")
    if not cls.trainable:
        trainable = sorted(n for n, c in methods.METHODS.items() if c.trainable)
        raise ConfigError(f"{source}: method {name!r} is not trained ahead (a per-subject fine-tune: use `hyperbooth finetune`); "
                          f"trainable: {', '.join(trainable)}")
    return cls


@functools.cache
def config_class(method_cls: type[Personalizer]) -> type[TrainConfig]:
    """:class:`TrainConfig` with ``hypernet`` typed as ``method_cls.config_class``, so the config loader checks its
    keys and values and ``hypernet.<key>=value`` overrides reach them (one class per method: configs compare equal)."""
    return dataclasses.make_dataclass(
        f"TrainConfig_{method_cls.__name__}",
        [("hypernet", method_cls.config_class, field(default_factory=method_cls.config_class))],
        bases=(TrainConfig,),
    )


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The training config of a YAML file plus ``key=value`` overrides, ``hypernet`` validated as the method's
    config. An unregistered ``method`` is a ConfigError naming it and the registered ones."""
    overrides = list(overrides or [])
    outer = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("hypernet.")]
    untyped = load_config(TrainConfig, path, outer)  # the method's name (the hypernet section is read below)
    method_cls = trainable_method(untyped.method, source=str(path) if path is not None else "config")
    return load_config(config_class(method_cls), path, overrides)


def method_config(cfg: TrainConfig, method_cls: type[Personalizer]):
    """``cfg.hypernet`` as the method's config (a dict, e.g. from a hand-built TrainConfig, is validated)."""
    if isinstance(cfg.hypernet, method_cls.config_class):
        return cfg.hypernet
    return config_from_dict(method_cls.config_class, dict(cfg.hypernet or {}), source="hypernet")


# -- one step's inputs ----------------------------------------------------------------------------------------------


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of global sample ``index``: its noise, timestep and dropout draws, whichever process runs it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for optimizer step ``step`` on process ``rank``: random draws a method makes inside its
    loss (dropout, its own sampling) are a function of the step, so ``--resume`` repeats them exactly."""
    return ((seed * 1_000_003 + step) << 8) + rank


def make_batch(batch: dict, backbone: Backbone, scheduler, cfg: TrainConfig) -> TrainBatch:
    """A collated batch (:func:`hyperbooth.train.data.collate`) → the method's :class:`TrainBatch` on the backbone's
    device: ``x0 = to_model(target)``, per-sample ε ~ N(0, I), t ~ U{0 … T−1} (σ·T on the schedule for flow
    matching: :func:`~hyperbooth.diffusion.training_timesteps`), prompts dropped to "" with
    probability ``cond_dropout``, then the forward process and the Min-SNR weights."""
    device = backbone.device
    gens = [sample_generator(cfg.seed, int(i)) for i in batch["index"]]
    with torch.no_grad():
        x0 = backbone.to_model(batch["target"].to(device)).float()  # (N, C, h, w)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
    index = torch.stack([torch.randint(0, backbone.num_train_timesteps, (), generator=g) for g in gens])
    t = training_timesteps(scheduler, index).to(device)  # the index itself, or σ·T for flow matching
    drop = [bool(torch.rand((), generator=g) < cfg.data.cond_dropout) for g in gens]
    prompts = ["" if dropped else p for p, dropped in zip(batch["prompt"], drop)]
    x_t, target = forward_process(scheduler, x0, noise, t)
    return TrainBatch(
        references=batch["references"].to(device),
        x0=x0, noise=noise, t=t, x_t=x_t, target=target,
        cond=backbone.encode_prompts(prompts),
        loss_weights=loss_weights(scheduler, t, cfg.min_snr_gamma),
        prompts=prompts,
        class_names=list(batch["class_name"]),
        extra={key: batch[key].to(device) for key in ("identity", "in_bank") if key in batch},
    )


class Objective(nn.Module):
    """The personalizer's training loss as a module's ``forward``, so that accelerate's wrappers act on it (DDP's
    gradient averaging, mixed-precision autocast). The frozen backbone is a plain attribute, outside the module
    tree: nothing of it is synchronized, prepared or saved."""

    def __init__(self, personalizer: Personalizer, backbone: Backbone):
        super().__init__()
        self.personalizer = personalizer
        self.backbone = backbone

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.personalizer.training_loss(batch, self.backbone)


# -- the loop -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, backbone: Backbone | None = None) -> Path:
    """Train (or resume) ``cfg.method`` on ``cfg.base_model``; returns the ``save_pretrained`` folder
    ``<out_dir>/hypernet``. ``backbone``: ``cfg.base_model`` already loaded (default: load it); it is moved to the
    training device."""
    method_cls = trainable_method(cfg.method)
    method_cfg = method_config(cfg, method_cls)
    optimizer_class(cfg.optim)  # optim.optimizer="adamw8bit" without bitsandbytes fails here, before the backbone loads
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    sharding.check_distributed(accelerator, cfg.optim.optimizer)  # DeepSpeed, FSDP1 refused; FSDP2: the personalizer one fp32 unit
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the {world} processes")
    local_batch = cfg.optim.batch_size // world
    out = Path(cfg.out_dir)

    if backbone is None:
        backbone = load_backbone(cfg.base_model or None, device=device, dtype=BACKBONE_DTYPES[cfg.mixed_precision])
    else:
        backbone.to(device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone.unet)
    scheduler = training_scheduler(backbone.scheduler.config)
    check_min_snr(scheduler, cfg.min_snr_gamma)
    dataset = build_dataset(cfg.data, backbone.resolution, size=cfg.optim.max_steps * cfg.optim.batch_size)  # bad photos fail here

    torch.manual_seed(cfg.seed)
    personalizer = method_cls.for_backbone(method_cfg, backbone).to(device).train()
    personalizer.check_training_data(cfg.data, dataset)  # e.g. HyperDreamBooth: every bank identity has a target
    if cfg.init_from:
        init_personalizer(personalizer, cfg.init_from)
    params = [p for p in personalizer.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {cfg.method!r} with this hypernet config has no trainable parameters")
    optimizer, lr_schedule = build_optimizer(params, cfg.optim)
    step = 0
    checkpoint = resume_checkpoint(out, resume)
    state = _load_checkpoint(checkpoint, cfg, personalizer) if checkpoint is not None else None  # the weights, before sharding
    objective, optimizer = accelerator.prepare(Objective(personalizer, backbone), optimizer)
    params = [p for p in personalizer.parameters() if p.requires_grad]  # under FSDP the prepared parameters are shards
    ema = build_ema(params, cfg.optim.ema_decay)
    if state is not None:  # the optimizer, schedule and EMA, into the prepared (possibly sharded) parameters
        sharding.load_optimizer_state(accelerator, objective, optimizer, state["optimizer"], state.get("optimizer_layout"), str(checkpoint))
        lr_schedule.load_state_dict(state["lr_schedule"])
        if ema is not None and state["ema"] is not None:
            sharding.load_ema_state(ema, state["ema"], params, device)
        step = int(state["step"])
        log.info("resumed from %s at step %d", checkpoint, step)

    # this process's share of each global batch: indices s·G + rank·b … s·G + (rank+1)·b − 1
    indices = [s * cfg.optim.batch_size + rank * local_batch + i for s in range(step, cfg.optim.max_steps) for i in range(local_batch)]
    loader = batches(dataset, indices, local_batch, cfg.data, progress=accelerator.is_main_process)

    log_file = writer = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log_file, writer = _open_log(out / "log.csv", step)
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc=f"train {cfg.method}", disable=not accelerator.is_main_process, dynamic_ncols=True)
    t_start = t_window = time.perf_counter()
    window: dict[str, float] = {}
    try:
        while step < cfg.optim.max_steps:
            torch.manual_seed(step_seed(cfg.seed, step, rank))  # global draws in a method's loss (dropout): exact on resume
            batch = make_batch(next(loader), backbone, scheduler, cfg)
            with sharding.autocast(accelerator):
                loss, scalars = objective(batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            lr_schedule.step()
            if ema is not None:
                ema.step(params)
            step += 1

            for name, value in {"loss": loss, **scalars}.items():
                window[name] = window.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
            if step % cfg.log_every == 0 or step == cfg.optim.max_steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                # the mean over the window and over processes (each holds the same share of every global batch)
                means = accelerator.reduce(torch.tensor(list(window.values()), device=device) / n, reduction="mean").tolist()
                rate = n * cfg.optim.batch_size / max(time.perf_counter() - t_window, 1e-9)
                if writer is not None:
                    writer.write(step, dict(zip(window, means)), lr_schedule.get_last_lr()[0], rate, time.perf_counter() - t_start)
                    log_file.flush()
                bar.set_postfix(loss=f"{means[0]:.4f}", samples_s=f"{rate:.1f}")
                window = dict.fromkeys(window, 0.0)
                t_window = time.perf_counter()
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.optim.max_steps:
                # gathered on every process (a collective under FSDP), written by the main one
                weights = sharding.full_model_state(accelerator, objective)
                opt_state, layout = sharding.optimizer_state(accelerator, objective, optimizer)
                shadows = sharding.ema_state(ema) if accelerator.is_main_process or sharding.is_sharded(accelerator) else None
                if accelerator.is_main_process:
                    extra = {"optimizer_layout": layout} if layout else {}
                    write_checkpoint(out, step, lambda folder: _write_checkpoint(
                        folder, personalizer, weights, training_state(step, opt_state, lr_schedule, shadows, to_dict(cfg), **extra)))
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if cfg.gradient_checkpointing:  # a backbone the caller passed in is handed back as it came
            backbone.unet.disable_gradient_checkpointing()
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # every process: under FSDP each copies its shards
    weights = sharding.full_model_state(accelerator, objective)
    if accelerator.is_main_process:
        # checkpoints keep fp32 (exact resume); the final folder may be stored in fp16 (the shipped checkpoint is)
        personalizer.save_pretrained(out / "hypernet", dtype=SAVE_DTYPES[cfg.save_dtype], state=weights, extra={
            "train_config": to_dict(cfg), "base_model": cfg.base_model or SHIPPED_WORLD_NAME, "backbone": backbone.name})
    log.info("trained %d steps in %.1f min on %d process%s (%s)", step, (time.perf_counter() - t_start) / 60, world,
             "es" if world > 1 else "", accelerator.distributed_type.value)
    return out / "hypernet"


class _LogWriter:
    """``log.csv``: step, the loss and every scalar the method returns (the header from the first logged step),
    lr, samples per second, elapsed seconds."""

    def __init__(self, file, header_written: bool):
        self.writer, self.header_written = csv.writer(file), header_written

    def write(self, step: int, values: dict[str, float], lr: float, rate: float, elapsed: float) -> None:
        if not self.header_written:
            self.writer.writerow(["step", *values, "lr", "samples_per_s", "elapsed_s"])
            self.header_written = True
        self.writer.writerow([step, *(f"{v:.5f}" for v in values.values()), f"{lr:.3e}", f"{rate:.1f}", f"{elapsed:.0f}"])


def _open_log(path: Path, step: int):
    """A fresh log at step 0; on resume, the log cut back to the rows up to ``step`` (a crashed run's later rows
    are dropped, the resumed run writes them again)."""
    if step and path.is_file():
        header = trim_log(path, step)
        log_file = open(path, "a", newline="")
        return log_file, _LogWriter(log_file, header_written=header)
    log_file = open(path, "w", newline="")
    return log_file, _LogWriter(log_file, header_written=False)


def _write_checkpoint(folder: Path, model: Personalizer, weights: dict[str, torch.Tensor], state: dict) -> None:
    model.save_pretrained(folder / "hypernet", state=weights)
    save_state(folder / "state.pt", state)


#: the config sections a resumed run must share with its checkpoint (the others — out_dir, logging, checkpointing,
#: gradient checkpointing, save_dtype — and the data loading settings below do not change the trajectory)
RESUME_KEYS = ("method", "base_model", "hypernet", "data", "optim", "min_snr_gamma", "seed", "mixed_precision")
LOADING_KEYS = ("num_workers", "prerender", "preload")


def _trajectory(config: dict) -> dict:
    """The parts of a resolved config (``to_dict``) that decide the run's updates."""
    kept = {k: config.get(k) for k in RESUME_KEYS}
    kept["data"] = {k: v for k, v in (kept["data"] or {}).items() if k not in LOADING_KEYS}
    return kept


def _differences(a, b, prefix: str = "") -> list[str]:
    """``"key: old in the checkpoint, new now"`` for every leaf where the nested dicts ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} in the checkpoint, {b!r} now"]


def _load_checkpoint(folder: Path, cfg: TrainConfig, model: Personalizer) -> dict:
    """Check that ``folder`` was trained with this config, load its weights into ``model``; returns its training
    state (optimizer, schedule, EMA, step) for after ``accelerator.prepare``."""
    state = load_state(folder / "state.pt")
    saved = dict(state.get("config") or {})
    # settings added to hyperbooth after the checkpoint was written take their defaults (what the run then used)
    saved["data"] = {**to_dict(DataConfig()), **(saved.get("data") or {})}
    saved["hypernet"] = {**to_dict(type(model.config)()), **(saved.get("hypernet") or {})}
    saved["optim"] = {**to_dict(type(cfg.optim)()), **(saved.get("optim") or {})}  # e.g. optim.optimizer: "adamw"
    changed = _differences(_trajectory(saved), _trajectory(to_dict(cfg)))
    if changed:
        raise CheckpointError(f"--resume: {folder} was trained with another config ({changed[0]}); resume with the same "
                              f"config, or train into a new out_dir")
    model.load_weights(folder / "hypernet" / WEIGHTS_NAME)
    return state
