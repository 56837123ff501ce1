"""Training checkpoints written atomically.

A checkpoint is a folder ``<out>/checkpoints/step-<N>/`` written under a temporary name and renamed when complete;
``<out>/checkpoints/latest`` (replaced atomically) names the newest one. An interrupted run therefore always finds
a complete checkpoint to resume from, and nothing already written is lost. Each checkpoint carries
``manifest.json``, the SHA-256 of every file in it: ``--resume`` takes the newest checkpoint whose files still match
(a truncated or bit-flipped one is named in the log and the one before it is used). State files are read with
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
    _write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


MANIFEST = "manifest.json"


def _file_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def _write_manifest(folder: Path) -> None:
    import json

    (folder / MANIFEST).write_text(json.dumps(_file_hashes(folder), indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint ``folder`` cannot be trusted (a file missing, changed or truncated since it was written), or
    None. A checkpoint written before manifests existed is trusted as it is."""
    import json

    manifest = folder / MANIFEST
    if not folder.is_dir():
        return "it does not exist"
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is damaged"
    found = _file_hashes(folder)
    for name, digest in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} differs from what was written (truncated or corrupted)"
    return None


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
    """The checkpoint ``--resume`` continues from — the newest one whose files match their manifest; a damaged one is
    named in the log and the one before it taken — or None to start at step 0, with a warning when ``--resume``
    found none. Every checkpoint damaged: a CheckpointError naming them."""
    if not resume:
        return None
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        log.warning("--resume: no checkpoint under %s; starting from step 0", out_dir)
        return None
    import re

    name = pointer.read_text().strip()
    named = [root / name] if re.fullmatch(r"step-\d+", name) else []  # a garbled pointer: the folders themselves decide
    candidates = named + sorted((p for p in root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name) and p not in named), reverse=True)
    if not candidates:
        log.warning("--resume: %s names no checkpoint folder (%r); starting from step 0", pointer, name)
        return None
    damaged = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged:
                log.warning("--resume: %s; resuming from %s instead", "; ".join(damaged), folder)
            return folder
        damaged.append(f"checkpoint {folder} is damaged ({problem})")
    raise CheckpointError(f"--resume: no usable checkpoint under {root}: {'; '.join(damaged)}; delete {root} to start over")


def training_state(step: int, optimizer, lr_schedule, ema, config: dict, **extra) -> dict:
    """What a checkpoint's ``state.pt`` holds besides the weights: the step, the optimizer's and the schedule's state,
    the EMA's (or None), the resolved config, and ``extra`` entries of one trainer. ``optimizer`` and ``ema`` may be
    objects or their state dicts already (gathered from shards: :mod:`hyperbooth.train.sharding`)."""
    return {
        "step": step,
        "optimizer": optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "ema": ema if ema is None or isinstance(ema, dict) else ema.state_dict(),
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


def trim_log(path: Path, step: int) -> bool:
    """Cut a CSV training log (first column: the step) back to its header and the rows up to ``step``: a run resumed
    from the checkpoint of ``step`` writes the later rows again, so none is repeated. Returns whether a header is
    there (False: the file is missing or empty, the caller starts it)."""
    import csv

    path = Path(path)
    if not path.is_file():
        return False
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step and len(r) == len(rows[0])]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    from hyperbooth.files import atomic_write

    atomic_write(path, write)  # a kill during the trim leaves the old log, never half of it
    return bool(kept)
