"""Training checkpoints written atomically.

A checkpoint is a folder ``<out>/checkpoints/step-<N>/`` written under a temporary name and renamed when complete;
``<out>/checkpoints/latest`` (replaced atomically) names the newest one. An interrupted run therefore always finds
a complete checkpoint to resume from, and nothing already written is lost. State files are read with
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from hyperbooth.errors import CheckpointError

log = logging.getLogger(__name__)


def write_checkpoint(out_dir: Path, step: int, write_fn, keep: int = 2) -> Path:
    """Call ``write_fn(folder)`` on a temporary folder, rename it to ``step-<step>``, point ``latest`` at it."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_fn(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir``, or None."""
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which does not exist; delete {pointer} to start over")
    return folder


def resume_checkpoint(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint ``--resume`` continues from (the newest complete one), or None to start at step 0 — with a
    warning when ``--resume`` found none."""
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint under %s; starting from step 0", out_dir)
    return checkpoint


def training_state(step: int, optimizer, lr_schedule, ema, config: dict, **extra) -> dict:
    """What a checkpoint's ``state.pt`` holds besides the weights: the step, the optimizer's and the schedule's state,
    the EMA's (or None), the resolved config, and ``extra`` entries of one trainer."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        **extra,
        "config": config,
    }


def save_state(path: Path, state: dict) -> None:
    torch.save(state, path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"training state {path} is missing; the checkpoint folder is incomplete") from None
    except Exception as e:
        raise CheckpointError(f"training state {path} cannot be read ({type(e).__name__}: {e})") from None
