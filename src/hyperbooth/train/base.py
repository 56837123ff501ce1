"""Training the embedded world's text-to-image base model (``hyperbooth train-base``).

Reads top to bottom: config → model, text encoder, data → loop (render a batch, noise it, predict, Min-SNR MSE,
AdamW, EMA) → atomic checkpoints → the exported diffusers model folder (EMA weights, fp16 safetensors). The
noising, targets and loss weights are :mod:`hyperbooth.diffusion`'s, the optimizer and schedule
:mod:`hyperbooth.train.optim`'s and the EMA :mod:`hyperbooth.train.ema`'s, shared with ``hyperbooth train``.

Data order is a function of the step (sample ``i`` of step ``s`` is dataset index ``s · B + i``) and the noise
comes from one seeded generator whose state is checkpointed, so ``--resume`` continues the exact run.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hyperbooth.config import save_config, to_dict
from hyperbooth.devices import resolve_device
from hyperbooth.diffusion import DEFAULT_MIN_SNR_GAMMA, PREDICTION_TYPES, diffusion_loss, forward_process, loss_weights
from hyperbooth.errors import ConfigError
from hyperbooth.text import TextEncoder
from hyperbooth.train.ema import build_ema, load_ema
from hyperbooth.train.optim import OptimConfig, build_optimizer
from hyperbooth.train.state import load_state, resume_checkpoint, save_state, training_state, trim_log, write_checkpoint
from hyperbooth.world.base_model import WORLD_UNET_CONFIG, save_world_model
from hyperbooth.world.datasets import BaseSampleDataset, PrerenderedDataset, check_describe

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    resolution: int = 32
    seed: int = 0
    cond_dropout: float = 0.1  # probability of training a sample on the empty prompt (for classifier-free guidance)
    text_max_length: int = 24
    num_workers: int = 1  # render processes
    prerender: bool = True  # render the whole run's samples first (on num_workers processes), then train from memory
    describe_color: float = 0.0  # probability a caption also names the subject's main colour ("a yellow ball …")
    describe_full: float = 0.0  # probability it names its colours, pattern and feature ("… with navy dots …")

    def validate(self) -> None:
        check_describe(self.describe_color, self.describe_full)
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"data.cond_dropout={self.cond_dropout} must be in [0, 1)")


@dataclass
class DiffusionConfig:
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    min_snr_gamma: float = DEFAULT_MIN_SNR_GAMMA  # 0 turns Min-SNR weighting off

    def validate(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"diffusion.prediction_type={self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ConfigError(f"diffusion.beta_schedule={self.beta_schedule!r} is not one of linear, scaled_linear, squaredcos_cap_v2")


@dataclass
class BaseTrainConfig:
    out_dir: str = "runs/world_base"
    unet: dict = field(default_factory=dict)  # overrides of WORLD_UNET_CONFIG
    init_from: str = ""  # a world model folder whose UNet starts the run (continued training); "" = random init
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"  # "no" or "bf16"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    checkpoint_every: int = 500
    log_every: int = 25

    def validate(self) -> None:
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} must be 'no' or 'bf16'")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every and log_every must be at least 1")


def build_unet(cfg: BaseTrainConfig) -> UNet2DConditionModel:
    config = {**WORLD_UNET_CONFIG, **cfg.unet, "sample_size": cfg.data.resolution}
    try:
        return UNet2DConditionModel(**config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"unet config is invalid: {e}") from None


def init_unet(unet: UNet2DConditionModel, folder: str) -> None:
    """Start from the UNet of the world model folder ``folder`` (its config must equal the run's)."""
    path = Path(folder) / "unet"
    try:
        source = UNet2DConditionModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={folder!r}: no readable world model UNet in {path} ({type(e).__name__}: {e})") from None
    differ = [k for k in unet.config if k != "_name_or_path" and not k.startswith("_") and unet.config[k] != source.config.get(k)]
    if differ:
        raise ConfigError(f"init_from={folder!r}: its UNet config differs from the run's in {differ[0]!r} "
                          f"({source.config.get(differ[0])!r} vs {unet.config[differ[0]]!r})")
    unet.load_state_dict(source.state_dict())
    log.info("initialised the UNet from %s", path)


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        # no clipping of the predicted x0 in the saved config: DDIM's step clips x0 to [-1, 1] and derives ε from the
        # clipped x0, which turned the world model's 20–60-step DDIM samples into noise (mean |Δ| 0.27 against
        # DPM-Solver++'s on the same seeds; 0.018 without clipping, as Euler's). Training never reads it.
        clip_sample=False,
    )


def _collate(items: list[dict]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([item["image"] for item in items]), [item["prompt"] for item in items]


class BatchSource:
    """Step → a training batch: rendered images, their prompts' token states, condition dropout applied.

    Images are rendered by ``num_workers`` DataLoader processes, ahead of the training step; sample ``i`` of step
    ``s`` is dataset index ``s · B + i`` whichever step the run (re)starts from.
    """

    def __init__(self, cfg: BaseTrainConfig, text_encoder, start_step: int):
        b = cfg.optim.batch_size
        dataset = BaseSampleDataset(split="train", size=cfg.optim.max_steps * b, resolution=cfg.data.resolution, seed=cfg.data.seed,
                                    describe_color=cfg.data.describe_color, describe_full=cfg.data.describe_full)
        indices = range(start_step * b, len(dataset))
        workers = cfg.data.num_workers
        if cfg.data.prerender:
            dataset, workers = PrerenderedDataset(dataset, indices, workers=workers), 0
        self.loader = iter(DataLoader(dataset, batch_size=b, sampler=indices, num_workers=workers, collate_fn=_collate,
                                      persistent_workers=False, prefetch_factor=4 if workers else None))
        self.text = text_encoder
        self.cond_dropout = cfg.data.cond_dropout

    def next(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, prompts = next(self.loader)  # (B, 3, H, W) in [-1, 1], B prompts
        drop = torch.rand(len(prompts), generator=generator) < self.cond_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        states, mask = self.text(prompts)  # (B, L, d), (B, L)
        return images, states, mask


def train_base(cfg: BaseTrainConfig, resume: bool = False) -> Path:
    """Train (or resume) and export the base model; returns the exported model folder."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    unet = build_unet(cfg)
    if cfg.init_from:
        init_unet(unet, cfg.init_from)
    unet = unet.to(device).train()
    scheduler = build_scheduler(cfg.diffusion)
    text = TextEncoder.minilm(max_length=cfg.data.text_max_length)
    optimizer, lr_schedule = build_optimizer(unet.parameters(), cfg.optim)
    ema = build_ema(unet.parameters(), cfg.optim.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    step = 0

    checkpoint = resume_checkpoint(out, resume)
    if checkpoint is not None:
        step = _load_checkpoint(checkpoint, unet, optimizer, lr_schedule, ema, generator, device)
        log.info("resumed from %s at step %d", checkpoint, step)
    save_config(cfg, out / "config.yaml")
    batches = BatchSource(cfg, text, start_step=step)

    csv_path = out / "log.csv"
    new_log = step == 0 or not trim_log(csv_path, step)  # resumed: the rows after the checkpoint are written again, once
    log_file = open(csv_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log_file)
    if new_log:
        writer.writerow(["step", "loss", "lr", "images_per_s", "elapsed_s"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc="train-base", dynamic_ncols=True)
    t_start = time.perf_counter()
    window_loss, window_images, t_window = 0.0, 0, time.perf_counter()
    try:
        while step < cfg.optim.max_steps:
            images, states, mask = batches.next(generator)
            images, states, mask = images.to(device), states.to(device), mask.to(device)
            noise = torch.randn(images.shape, generator=generator).to(device)
            t = torch.randint(0, cfg.diffusion.num_train_timesteps, (images.shape[0],), generator=generator).to(device)
            x_t, target = forward_process(scheduler, images, noise, t)
            weights = loss_weights(scheduler, t, cfg.diffusion.min_snr_gamma)
            with autocast:
                pred = unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
            loss = diffusion_loss(pred, target, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            lr_schedule.step()
            if ema is not None:
                ema.step(unet.parameters())
            step += 1

            window_loss += loss.item()
            window_images += images.shape[0]
            if step % cfg.log_every == 0 or step == cfg.optim.max_steps:
                elapsed = time.perf_counter() - t_window
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                ips = window_images / max(elapsed, 1e-9)
                writer.writerow([step, f"{window_loss / n:.5f}", f"{lr_schedule.get_last_lr()[0]:.3e}", f"{ips:.1f}", f"{time.perf_counter() - t_start:.0f}"])
                log_file.flush()
                bar.set_postfix(loss=f"{window_loss / n:.4f}", img_s=f"{ips:.1f}")
                window_loss, window_images, t_window = 0.0, 0, time.perf_counter()
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.optim.max_steps:
                write_checkpoint(out, step, lambda folder: _write_checkpoint(folder, cfg, step, unet, optimizer, lr_schedule, ema, generator))
    finally:
        bar.close()
        log_file.close()
    log.info("trained %d steps in %.1f min", step, (time.perf_counter() - t_start) / 60)
    return export_base_model(out / "model", cfg, unet, ema, scheduler)


def _write_checkpoint(folder: Path, cfg, step, unet, optimizer, lr_schedule, ema, generator) -> None:
    unet.save_pretrained(folder / "unet")
    save_state(folder / "state.pt", training_state(step, optimizer, lr_schedule, ema, to_dict(cfg), generator=generator.get_state()))


def _load_checkpoint(folder: Path, unet, optimizer, lr_schedule, ema, generator, device) -> int:
    state = load_state(folder / "state.pt")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.load_state_dict(load_file(str(weights)))
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if ema is not None and state["ema"] is not None:
        load_ema(ema, state["ema"], device)
    generator.set_state(state["generator"])
    return int(state["step"])


def export_base_model(folder: Path, cfg: BaseTrainConfig, unet, ema, scheduler) -> Path:
    """Write the EMA weights (the trained ones without EMA) as a diffusers model folder (fp16 safetensors) with the
    resolved config."""
    if ema is not None:
        ema.copy_to(unet.parameters())
    return save_world_model(folder, unet.eval(), scheduler, cfg)
