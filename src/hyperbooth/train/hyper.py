"""The hypernetwork training engine (``hyperbooth train``), shared by the methods.

Reads top to bottom: config → frozen base model (UNet + text encoder) and the method's hypernetwork → loop:
references → hypernetwork → per-sample LoRA in the frozen UNet → diffusion loss on the target image
+ λ · Σ_l ‖ΔW_l‖²_F (the output regularization; λ = 0 allowed) → AdamW on the hypernetwork only → EMA →
atomic checkpoints → ``save_pretrained`` folder.

accelerate handles devices, mixed precision and data parallelism (``accelerate launch -m hyperbooth train …``).
Every random draw of a sample (its data, noise, timestep, condition dropout) is a function of its *global* index,
so the same global batch gives the same update on one process or several, and ``--resume`` continues exactly.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hyperbooth.config import save_config, to_dict
from hyperbooth.diffusion import diffusion_loss, loss_weights, training_target
from hyperbooth.errors import ConfigError
from hyperbooth.lora.inject import LoRAInjector, target_shapes
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.train.base import OptimConfig
from hyperbooth.train.ema import EMA
from hyperbooth.train.state import latest_checkpoint, load_state, save_state, warmup_cosine, write_checkpoint

SAVE_DTYPES = {"fp32": None, "fp16": torch.float16}  # None: the parameters' own dtype (fp32)

log = logging.getLogger(__name__)


@dataclass
class PairDataConfig:
    mode: str = "cross"  # "cross" (target in another context) or "same" (target = the reference)
    k: int = 1  # reference images per subject
    resolution: int = 32
    seed: int = 0
    cond_dropout: float = 0.05
    num_workers: int = 1  # render processes
    prerender: bool = True  # render this process's samples first (on num_workers processes), then train from memory

    def validate(self) -> None:
        if self.mode not in ("cross", "same"):
            raise ConfigError(f"data.mode={self.mode!r} must be 'cross' or 'same'")
        if self.k < 1:
            raise ConfigError(f"data.k={self.k} must be at least 1")


@dataclass
class HyperOptimConfig(OptimConfig):
    """The base trainer's optimizer settings with the hypernetwork's defaults (batch_size is the global batch)."""

    lr: float = 3e-4
    max_steps: int = 4000
    ema_decay: float = 0.0  # 0 turns EMA off


@dataclass
class HyperTrainConfig:
    method: str = "e2e"
    base_model: str = ""  # base model folder; empty = the shipped world model
    out_dir: str = "runs/hyper"
    output_reg: float = 1e-3  # λ of the output regularization; 0 allowed (the ablation)
    hypernet: E2EConfig = field(default_factory=E2EConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    optim: HyperOptimConfig = field(default_factory=HyperOptimConfig)
    seed: int = 0
    mixed_precision: str = "no"  # "no" or "bf16"
    checkpoint_every: int = 250
    log_every: int = 25
    save_dtype: str = "fp32"  # dtype of the final ``hypernet`` folder's weights: "fp32" or "fp16" (half the file)

    def validate(self) -> None:
        if self.method != "e2e":
            raise ConfigError(f"method={self.method!r} is not implemented yet; available: e2e")
        if self.output_reg < 0:
            raise ConfigError(f"output_reg={self.output_reg} must be >= 0")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} must be 'no' or 'bf16'")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_dtype={self.save_dtype!r} must be one of {', '.join(map(repr, SAVE_DTYPES))}")


def _sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _collate(items: list[dict]) -> dict:
    return {
        "references": torch.stack([i["references"] for i in items]),
        "target": torch.stack([i["target"] for i in items]),
        "prompt": [i["prompt"] for i in items],
        "index": torch.tensor([i["index"] for i in items]),
    }


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "index": i}


def train_hypernet(cfg: HyperTrainConfig, resume: bool = False, base=None) -> Path:
    """Train (or resume) a hypernetwork; returns its ``save_pretrained`` folder. ``base``: a loaded
    :class:`WorldBackbone` (default: load ``cfg.base_model``)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from hyperbooth.backbones.world import WorldBackbone
    from hyperbooth.world.datasets import PersonalizationPairDataset

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    out = Path(cfg.out_dir)
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the {world} processes")
    local_batch = cfg.optim.batch_size // world

    base = base or WorldBackbone.from_pretrained(cfg.base_model or None)
    unet = base.unet.to(device).eval().requires_grad_(False)
    alphas_cumprod = base.scheduler.alphas_cumprod.to(device)
    prediction_type = base.scheduler.config.prediction_type
    injector = LoRAInjector(unet)
    torch.manual_seed(cfg.seed)
    hypernet = E2EHyperNetwork(cfg.hypernet, target_shapes(unet, cfg.hypernet.targets))
    optimizer = torch.optim.AdamW([p for p in hypernet.parameters() if p.requires_grad], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.min_lr_ratio))
    ema = EMA(hypernet, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    step = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        step = _load_checkpoint(checkpoint, hypernet, optimizer, lr_schedule, ema)
        log.info("resumed from %s at step %d", checkpoint, step)
    hypernet, optimizer = accelerator.prepare(hypernet, optimizer)

    d = cfg.data
    pairs = _Indexed(PersonalizationPairDataset("train", size=cfg.optim.max_steps * cfg.optim.batch_size, k=d.k, mode=d.mode, resolution=d.resolution, seed=d.seed))
    # this process's share of each global batch: indices s·G + rank·b … s·G + (rank+1)·b − 1
    indices = [s * cfg.optim.batch_size + rank * local_batch + i for s in range(step, cfg.optim.max_steps) for i in range(local_batch)]
    workers = d.num_workers
    if d.prerender:
        from hyperbooth.world.datasets import PrerenderedDataset

        pairs, workers = PrerenderedDataset(pairs, indices, workers=workers, progress=accelerator.is_main_process), 0
    loader = iter(DataLoader(pairs, batch_size=local_batch, sampler=indices, num_workers=workers, collate_fn=_collate, prefetch_factor=4 if workers else None))

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        csv_file = open(out / "log.csv", "a" if step else "w", newline="")
        writer = csv.writer(csv_file)
        if not step:
            writer.writerow(["step", "loss", "diffusion_loss", "reg", "lr", "samples_per_s", "elapsed_s"])
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc=f"train {cfg.method}", disable=not accelerator.is_main_process, dynamic_ncols=True)
    t_start = t_window = time.perf_counter()
    window = torch.zeros(3)
    while step < cfg.optim.max_steps:
        batch = next(loader)
        refs, x0 = batch["references"].to(device), batch["target"].to(device)
        gens = [_sample_generator(cfg.seed, int(i)) for i in batch["index"]]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        t = torch.stack([torch.randint(0, len(alphas_cumprod), (), generator=g) for g in gens]).to(device)
        drop = [bool(torch.rand((), generator=g) < d.cond_dropout) for g in gens]
        states, mask = base.text_encoder(["" if dr else p for p, dr in zip(batch["prompt"], drop)])
        x_t = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * noise
        target = training_target(prediction_type, x0, noise, alphas_cumprod, t)

        with accelerator.autocast():
            weights = hypernet(refs)  # LoRAWeights, N = local batch
            with injector.apply(weights, mode="per_sample"):
                pred = unet(x_t, t, encoder_hidden_states=states.to(device), encoder_attention_mask=mask.to(device)).sample
        diff = diffusion_loss(pred, target, loss_weights(prediction_type, alphas_cumprod, t, 5.0))
        reg = weights.frobenius_sq().mean()
        loss = diff + cfg.output_reg * reg
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(hypernet.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        lr_schedule.step()
        if ema is not None:
            ema.update(accelerator.unwrap_model(hypernet))
        step += 1

        window += torch.tensor([loss.item(), diff.item(), reg.item()])
        if accelerator.is_main_process and (step % cfg.log_every == 0 or step == cfg.optim.max_steps):
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            rate = n * cfg.optim.batch_size / max(time.perf_counter() - t_window, 1e-9)
            mean = (window / n).tolist()
            writer.writerow([step, f"{mean[0]:.5f}", f"{mean[1]:.5f}", f"{mean[2]:.5f}", f"{lr_schedule.get_last_lr()[0]:.3e}", f"{rate:.1f}", f"{time.perf_counter() - t_start:.0f}"])
            csv_file.flush()
            bar.set_postfix(loss=f"{mean[0]:.4f}", reg=f"{mean[2]:.3g}", samples_s=f"{rate:.1f}")
            window.zero_()
            t_window = time.perf_counter()
        bar.update(1)
        if accelerator.is_main_process and (step % cfg.checkpoint_every == 0 or step == cfg.optim.max_steps):
            model = accelerator.unwrap_model(hypernet)
            write_checkpoint(out, step, lambda folder: _write_checkpoint(folder, cfg, step, model, optimizer, lr_schedule, ema))
    bar.close()
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(hypernet)
    if accelerator.is_main_process:
        csv_file.close()
        if ema is not None:
            ema.copy_to(final)
        # checkpoints keep fp32 (exact resume); the final folder may be stored in fp16 (the shipped checkpoint is)
        final.save_pretrained(out / "hypernet", extra={"train_config": to_dict(cfg), "base_model": cfg.base_model or "hyperbooth:world/base"},
                              dtype=SAVE_DTYPES[cfg.save_dtype])
    return out / "hypernet"


def _write_checkpoint(folder: Path, cfg, step, model, optimizer, lr_schedule, ema) -> None:
    model.save_pretrained(folder / "hypernet")
    save_state(folder / "state.pt", {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "config": to_dict(cfg),
    })


def _load_checkpoint(folder: Path, model, optimizer, lr_schedule, ema) -> int:
    from safetensors.torch import load_file

    from hyperbooth.methods.base import WEIGHTS_NAME

    state = load_state(folder / "state.pt")
    model.load_state_dict(load_file(str(folder / "hypernet" / WEIGHTS_NAME)), strict=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])
