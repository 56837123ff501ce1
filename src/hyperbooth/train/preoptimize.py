"""HyperDreamBooth's pre-optimization (``hyperbooth preoptimize``): LiDB weights fitted per training identity, many
identities at once, as the hypernetwork's regression targets ``θ*``.

A bank of M training identities (:func:`hyperbooth.world.datasets.bank_identities`) is cut into shards of
``shard_size``; a shard is optimized as one batch, one row per identity, through per-sample LoRA: each row's LiDB
variables (``A_train (r, a_l)``, ``B_train (b_l, r)`` per layer, all rows starting from the same
:func:`~hyperbooth.methods.hyperdreambooth.lidb_init`) see only their own identity's images. Each identity's
draws (which of its images, the noise, the timestep) come from a generator seeded by ``(seed, identity, step)``,
the loss is the *sum* of the rows' diffusion losses and Adam works element by element, so a shard gives each
identity what a run of that identity alone would (a test checks it).

An identity's images: on the world, ``pool`` renders of it (``mode: cross``: in random contexts, each with its
rare-token prompt, as the hypernetwork's cross-context training pairs; ``same``: its reference renders in random
backgrounds), rendered once per shard. From photos (``data_path``: a flat folder of single-subject photos, e.g. a face
set, as the paper pre-optimizes CelebA-HQ): each photo is an identity (its index among the sorted file names, the key
``hyperbooth train`` with ``data.kind: folder`` gives the same photo), seen as itself and flipped, with its caption
(``<photo>.txt``) or ``"a <token> <class_name>"``.

Output, in ``out_dir``: ``preopt_config.json`` (the settings and target shapes) and one ``lidb-<shard>.safetensors``
per finished shard (``<layer>.A_train (S, r, a_l)``, ``<layer>.B_train (S, b_l, r)``, ``identities (S,)``; the LiDB
settings and target shapes in the header), written atomically. ``--resume`` skips finished shards and continues an
unfinished one from its latest checkpoint (``.shard-<n>/checkpoints``), exactly; the CSV log drops the lines of
steps after that checkpoint before continuing.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperbooth.backbones import Backbone, load_backbone
from hyperbooth.backbones.base import Conditioning
from hyperbooth.config import save_config, to_dict
from hyperbooth.devices import resolve_device, resolve_dtype
from hyperbooth.diffusion import DEFAULT_MIN_SNR_GAMMA, check_min_snr, forward_process, loss_weights, training_scheduler, training_timesteps
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.files import atomic_write
from hyperbooth.methods.hyperdreambooth import TARGETS_CONFIG, all_target_shapes, lidb_dims, lidb_init, split_components
from hyperbooth.methods.lidb import DEFAULT_A, DEFAULT_B, DEFAULT_RANK, aux_bases, lidb_weights, num_variables
from hyperbooth.prompts import RARE_TOKEN
from hyperbooth.train.state import load_state, resume_checkpoint, save_state, write_checkpoint
from hyperbooth.world.datasets import PersonalizationPairDataset, bank_identities

log = logging.getLogger(__name__)

MODES = ("cross", "same")


@dataclass
class PreoptConfig:
    base_model: str = ""  # the backbone (empty: the shipped world model)
    out_dir: str = "runs/hyperdreambooth_preopt"
    rank: int = DEFAULT_RANK  # LiDB settings: the hypernetwork must use the same ones
    a: int = DEFAULT_A
    b: int = DEFAULT_B
    basis_seed: int = 0
    targets: tuple[str, ...] = ()  # UNet module patterns; empty: the backbone's default
    text_targets: tuple[str, ...] = ()  # text-encoder module patterns (SD), as the hypernetwork's
    identities: int = 256  # bank size M (the hypernetwork's data.identities)
    identity_start: int = 0  # the bank: the first M training seeds from this one (data.identity_start)
    shard_size: int = 32  # identities optimized together (batch rows); one file each
    steps: int = 150  # optimizer steps per shard (each identity sees one image per step)
    lr: float = 3e-3
    pool: int = 16  # images rendered per identity
    mode: str = "cross"  # "cross": renders in random contexts with their prompts; "same": reference renders only
    token: str = RARE_TOKEN
    data_path: str = ""  # a flat folder of single-subject photos, each one identity; empty: the world's identity bank
    class_name: str = ""  # data_path: the prompt "a <token> <class_name>" of photos without a caption file
    min_snr_gamma: float = DEFAULT_MIN_SNR_GAMMA
    device: str = "auto"  # cpu, cuda, cuda:1, mps, auto
    dtype: str = "float32"  # the frozen backbone's (bfloat16 on GPUs that have it); the variables stay float32
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10

    def validate(self) -> None:
        for key in ("rank", "a", "b", "identities", "shard_size", "steps", "pool", "checkpoint_every", "log_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be positive")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        if self.identity_start < 0 or self.min_snr_gamma < 0:
            raise ConfigError("identity_start and min_snr_gamma must be >= 0")


def shard_path(out: Path, shard: int) -> Path:
    return out / f"lidb-{shard:05d}.safetensors"


def render_pool(identity: int, cfg: PreoptConfig, resolution: int, photos=None) -> tuple[torch.Tensor, list[str]]:
    """``pool`` images of one identity ``(P, 3, H, W)`` in [-1, 1] and their prompts (a function of the seed and the
    identity alone); from ``photos`` (a :class:`~hyperbooth.train.data.PhotoFolderDataset`): the photo and its mirror
    image, repeated to ``pool``."""
    if photos is not None:
        image = photos.photos[identity]
        images = [image if i % 2 == 0 else image.flip(-1) for i in range(cfg.pool)]
        return torch.stack(images), [photos.prompts[identity]] * cfg.pool
    data = PersonalizationPairDataset("train", size=cfg.pool, k=1, mode=cfg.mode, resolution=resolution,
                                      seed=cfg.seed * 1_000_003 + identity, token=cfg.token, identities=[identity])
    items = [data[i] for i in range(cfg.pool)]
    return torch.stack([it["target"] for it in items]), [it["prompt"] for it in items]


def _rows(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    return Conditioning(cond.states[index], None if cond.mask is None else cond.mask[index], {k: v[index] for k, v in cond.added.items()})


def draw_generator(seed: int, identity: int, step: int) -> torch.Generator:
    """The generator of one identity's draws at one step: the same in a shard of any size and on resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + identity) * 100_003 + step)


def photo_folder(cfg: PreoptConfig, resolution: int):
    """The photos of ``cfg.data_path`` (each file checked), or None for the world."""
    if not cfg.data_path:
        return None
    from hyperbooth.train.data import DataConfig, PhotoFolderDataset

    return PhotoFolderDataset(DataConfig(kind="folder", path=cfg.data_path, class_name=cfg.class_name, token=cfg.token, preload=False), resolution, size=1)


def bank(cfg: PreoptConfig, photos=None) -> list[int]:
    """The identities to pre-optimize: the world's bank, or the first ``identities`` photos of the folder."""
    if photos is None:
        return bank_identities(cfg.identities, cfg.identity_start)
    if cfg.identity_start + cfg.identities > len(photos.photos):
        raise ConfigError(f"identities={cfg.identities} from identity_start={cfg.identity_start}: {cfg.data_path} holds {len(photos.photos)} photos")
    return list(range(cfg.identity_start, cfg.identity_start + cfg.identities))


def optimize_shard(backbone: Backbone, identities: list[int], cfg: PreoptConfig, checkpoint_dir: Path | None = None,
                   resume: bool = False, on_log=None, callback=None, photos=None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Fit the LiDB variables of ``identities`` together (one row each) for ``cfg.steps`` steps; returns
    name → ``(A_train (S, r, a_l), B_train (S, b_l, r))`` and the last step's mean loss. With ``checkpoint_dir``
    the state is checkpointed every ``checkpoint_every`` steps (and continued from there with ``resume``).
    ``callback(step, variables)`` after each step, with detached variables (e.g. to evaluate a curve)."""
    shapes = all_target_shapes(backbone, cfg.targets, cfg.text_targets)
    device, dtype = backbone.device, backbone.dtype
    bases = {name: (A.to(device), B.to(device)) for name, (A, B) in aux_bases(shapes, cfg.a, cfg.b, cfg.basis_seed).items()}
    init = lidb_init(shapes, cfg.rank, cfg.a, cfg.b, cfg.basis_seed)
    s = len(identities)
    A = {n: torch.nn.Parameter(init[n][0].expand(s, -1, -1).clone().to(device)) for n in shapes}
    B = {n: torch.nn.Parameter(init[n][1].expand(s, -1, -1).clone().to(device)) for n in shapes}
    params = [p for n in shapes for p in (A[n], B[n])]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = training_scheduler(backbone.scheduler.config)
    check_min_snr(scheduler, cfg.min_snr_gamma)

    images, prompts = [], []
    for identity in identities:
        pool, texts = render_pool(identity, cfg, backbone.resolution, photos)
        images.append(pool)
        prompts.extend(texts)
    with torch.no_grad():
        x0_pool = backbone.to_model(torch.cat(images).to(device=device, dtype=dtype)).float()  # (S·P, C, h, w)
        cond_pool = backbone.encode_prompts(prompts) if not cfg.text_targets else None

    start = 0
    checkpoint = resume_checkpoint(checkpoint_dir, resume) if checkpoint_dir is not None else None
    if checkpoint is not None:
        state = load_state(checkpoint / "state.pt")
        if state.get("identities") != list(identities):
            raise CheckpointError(f"{checkpoint} belongs to other identities than this shard's; delete {checkpoint_dir} to start it over")
        with torch.no_grad():
            for i, n in enumerate(shapes):
                A[n].copy_(state["A"][i])
                B[n].copy_(state["B"][i])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log.info("shard resumed from %s at step %d", checkpoint, start)

    unet = backbone.unet
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)
    last = float("nan")
    try:
        for step in range(start, cfg.steps):
            gens = [draw_generator(cfg.seed, identity, step) for identity in identities]
            pick = torch.tensor([j * cfg.pool + int(torch.randint(cfg.pool, (), generator=g)) for j, g in enumerate(gens)])
            x0 = x0_pool[pick.to(device)]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
            t = training_timesteps(scheduler, torch.stack([torch.randint(0, backbone.num_train_timesteps, (), generator=g) for g in gens])).to(device)
            x_t, target = forward_process(scheduler, x0, noise, t)
            weights = split_components(lidb_weights({n: (A[n], B[n]) for n in shapes}, bases, float(cfg.rank)))
            if isinstance(weights, dict):  # each row's prompt through its own text-encoder LoRA
                cond = backbone.encode_prompts([prompts[int(i)] for i in pick], lora=weights["text_encoder"])
                weights = weights["unet"]
            else:
                cond = _rows(cond_pool, pick.to(device))
            with backbone.apply_lora(weights, mode="per_sample"):
                pred = backbone.denoise(x_t.to(dtype), t, cond)
            per_row = (pred.float() - target).pow(2).flatten(1).mean(dim=1) * loss_weights(scheduler, t, cfg.min_snr_gamma)
            loss = per_row.sum()  # each row's gradient is its own identity's, as in a run of it alone
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = float(per_row.detach().mean())
            done = step + 1
            if on_log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                on_log(done, last)
            if callback is not None:
                callback(done, {n: (A[n].detach(), B[n].detach()) for n in shapes})
            if checkpoint_dir is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                def write(folder: Path, done=done) -> None:
                    save_state(folder / "state.pt", {"step": done, "identities": list(identities), "optimizer": optimizer.state_dict(),
                                                     "A": [A[n].detach().cpu() for n in shapes], "B": [B[n].detach().cpu() for n in shapes]})
                write_checkpoint(checkpoint_dir, done, write)
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(requires_grad[name])
    return {n: (A[n].detach().cpu(), B[n].detach().cpu()) for n in shapes}, last


def identity_source(photos=None) -> dict[str, str]:
    """What the identity keys mean, for the shard header: the world's seeds, or a photo folder's indices (with the
    digest of its sorted file names and their number)."""
    if photos is None:
        return {"hyperbooth.identities": "world"}
    from hyperbooth.train.data import names_digest

    return {"hyperbooth.identities": "folder", "hyperbooth.identity_digest": names_digest(photos.photos.files),
            "hyperbooth.identity_count": str(len(photos.photos.files))}


def _save_shard(path: Path, identities: list[int], variables: dict, cfg: PreoptConfig, shapes: dict, backbone: Backbone, loss: float,
                seconds: float, source: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {"identities": torch.tensor(identities, dtype=torch.int64)}
    for name, (A, B) in variables.items():
        tensors[f"{name}.A_train"] = A.contiguous()
        tensors[f"{name}.B_train"] = B.contiguous()
    metadata = {
        "hyperbooth.lidb": json.dumps({"rank": cfg.rank, "a": cfg.a, "b": cfg.b, "basis_seed": cfg.basis_seed}),
        "hyperbooth.target_shapes": json.dumps({k: list(v) for k, v in shapes.items()}),
        "hyperbooth.backbone": backbone.name,
        "hyperbooth.base_model": cfg.base_model or "hyperbooth:world/base",
        **source,
        "hyperbooth.steps": str(cfg.steps),
        "hyperbooth.final_loss": f"{loss:.6f}",
        "hyperbooth.seconds": f"{seconds:.1f}",
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _trim_log(path: Path, shard: int, step: int) -> None:
    """Drop the log lines of ``shard`` after ``step`` (a resumed shard logs them again) and of later shards."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) < shard or (int(r[0]) == shard and int(r[1]) <= step)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(",".join(r) + "\n" for r in kept)))


#: settings that do not change the targets (a resumed run may change them)
NOT_RESULT_KEYS = ("out_dir", "device", "checkpoint_every", "log_every")


def _result_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS}


def preoptimize(cfg: PreoptConfig, resume: bool = False, backbone: Backbone | None = None) -> Path:
    """Pre-optimize the bank ``cfg`` names, shard by shard; returns ``out_dir``."""
    cfg.validate()
    out = Path(cfg.out_dir)
    config_file = out / TARGETS_CONFIG
    if config_file.is_file() and not resume:  # refused before anything loads; nothing written is touched
        raise ConfigError(f"{out} already holds a pre-optimization; pass --resume to continue it or choose another out_dir")
    if backbone is None:
        backbone = load_backbone(cfg.base_model or None, device=resolve_device(cfg.device, "device"), dtype=resolve_dtype(cfg.dtype, "dtype"))
    shapes = all_target_shapes(backbone, cfg.targets, cfg.text_targets)
    photos = photo_folder(cfg, backbone.resolution)  # a damaged photo is named before any work
    seeds = bank(cfg, photos)
    shards = [seeds[i:i + cfg.shard_size] for i in range(0, len(seeds), cfg.shard_size)]
    summary = {"config": to_dict(cfg), "target_shapes": {k: list(v) for k, v in shapes.items()}, "backbone": backbone.name,
               "lidb_dims": {k: list(v) for k, v in lidb_dims(shapes, cfg.a, cfg.b).items()},
               "variables_per_identity": num_variables(shapes, cfg.rank, cfg.a, cfg.b), "shards": len(shards)}
    if config_file.is_file():
        try:
            previous = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume: {config_file} cannot be read ({type(e).__name__}); use another out_dir") from None
        old, new = _result_settings(previous.get("config") or {}), _result_settings(summary["config"])
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed or previous.get("target_shapes") != summary["target_shapes"]:
            what = f"{changed[0]}: {old.get(changed[0])!r} then, {new.get(changed[0])!r} now" if changed else "target layers"
            raise ConfigError(f"--resume: {config_file} was written with other settings ({what}); use another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(config_file, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    save_config(cfg, out / "config.yaml")
    log_path = out / "log.csv"
    if not log_path.is_file():
        log_path.write_text("shard,step,loss,seconds\n")
    log.info("pre-optimizing %d identities in %d shards of %d, %d variables each", len(seeds), len(shards), cfg.shard_size, summary["variables_per_identity"])
    t_all = time.perf_counter()
    for index, chunk in enumerate(shards):
        path = shard_path(out, index)
        if path.is_file():
            continue
        ckpt_dir = out / f".shard-{index:05d}"
        resumed = resume_checkpoint(ckpt_dir, True) if ckpt_dir.is_dir() else None
        _trim_log(log_path, index, int(resumed.name.split("-")[-1]) if resumed is not None else 0)
        t0 = time.perf_counter()

        def on_log(step: int, value: float, index=index, t0=t0) -> None:
            with open(log_path, "a") as f:
                f.write(f"{index},{step},{value:.6f},{time.perf_counter() - t0:.1f}\n")

        variables, loss = optimize_shard(backbone, chunk, cfg, checkpoint_dir=ckpt_dir, resume=resumed is not None, on_log=on_log, photos=photos)
        seconds = time.perf_counter() - t0
        _save_shard(path, chunk, variables, cfg, shapes, backbone, loss, seconds, identity_source(photos))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log.info("shard %d/%d (%d identities): loss %.4f, %.0f s", index + 1, len(shards), len(chunk), loss, seconds)
    log.info("pre-optimization done in %.1f min", (time.perf_counter() - t_all) / 60)
    return out
