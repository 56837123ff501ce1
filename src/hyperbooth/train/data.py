"""Training data for ``hyperbooth train``: (reference images of a subject, a target image of it, its prompt, its
class), from the world's renders or from folders of photos.

Every sample is ``{"references": (k, 3, H, W), "target": (3, H, W), "prompt": str, "class_name": str | None}``, images
in [-1, 1] at the backbone's resolution, and a function of ``(data.seed, index)`` alone: any process, worker or
resumed run sees the same sample for the same index.

``data.kind``:

- ``world``: the world's :class:`~hyperbooth.world.datasets.PersonalizationPairDataset` (``mode: cross`` — the target
  in another context — or ``same``), rendered ahead of training (``prerender``).
- ``dreambench``: DreamBench's layout, a folder of photos per subject (``<path>/<subject>/*.jpg``; ``subjects`` picks
  some of them). The class of a subject is read from ``classes_file`` (a table like DreamBench's
  ``prompts_and_classes.txt``) when given, else it is ``class_name`` when set, else the folder's name (underscores
  read as spaces). Sample ``i``: a random subject, ``k`` of its photos as references and another one as the target
  (``mode: cross``; ``same``: reference 0 itself), the target flipped left-right with probability ``flip_p``;
  prompt ``"a sks <class>"``.
- ``folder``: a flat folder of single-subject photos (a face set): each photo is a subject, its own reference and
  its target (flipped left-right with probability ``flip_p``); prompt: the sidecar caption ``<photo>.txt`` when there
  is one (used as written), else ``"a sks <class_name>"``. Each photo is drawn once per epoch, in an order shuffled
  per epoch.

Photos are read with :func:`hyperbooth.images.load_image` (centre crop, resize) when the dataset is built, so a
damaged file stops the run with an :class:`~hyperbooth.errors.ImageLoadError` naming it before training starts;
with ``preload`` (the default) they are kept in memory as uint8 (``3·H·W`` bytes each: 768 KB at 512x512).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hyperbooth.errors import ConfigError, ImageLoadError
from hyperbooth.evaluation.dreambench import parse_prompts_file
from hyperbooth.images import IMAGE_SUFFIXES, load_image
from hyperbooth.prompts import RARE_TOKEN, instance_prompt
from hyperbooth.world.datasets import PersonalizationPairDataset, PrerenderedDataset, bank_identities

DATA_KINDS = ("world", "dreambench", "folder")
MODES = ("cross", "same")


@dataclass
class DataConfig:
    kind: str = "world"  # "world", "dreambench" (a folder per subject) or "folder" (a flat folder of single-subject photos)
    path: str = ""  # image folders: the dataset folder
    mode: str = "cross"  # world / dreambench: "cross" (target another image of the subject) or "same" (target = reference 0)
    k: int = 1  # reference images per sample
    subjects: tuple[str, ...] = ()  # dreambench: only these subject folders (default: all; e.g. hold out the ones you evaluate on)
    classes_file: str = ""  # dreambench: a subject,class table (DreamBench's prompts_and_classes.txt)
    class_name: str = ""  # dreambench: the class of subjects the table does not name; folder: of uncaptioned photos
    token: str = RARE_TOKEN  # the subject's word in "a sks <class>"
    flip_p: float = 0.0  # image folders: probability of flipping the target left-right
    preload: bool = True  # image folders: keep the decoded photos in memory (uint8)
    seed: int = 0
    cond_dropout: float = 0.05  # probability of training a sample on the empty prompt (for classifier-free guidance)
    num_workers: int = 1  # world: render processes; image folders: DataLoader workers
    prerender: bool = True  # world: render this process's samples first (on num_workers processes), then train from memory
    identities: int = 0  # world: draw subjects from a fixed bank of this many training identities (0: a fresh one per sample)
    identity_start: int = 0  # world: the bank is the first `identities` training seeds from this one (world.datasets.bank_identities)
    bank_fraction: float = 1.0  # world, with a bank: the share of samples drawn from it (the rest are fresh identities)

    def validate(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind={self.kind!r} must be one of {', '.join(DATA_KINDS)}")
        if self.mode not in MODES:
            raise ConfigError(f"data.mode={self.mode!r} must be 'cross' or 'same'")
        if self.k < 1:
            raise ConfigError(f"data.k={self.k} must be at least 1")
        if self.kind != "world" and not self.path:
            raise ConfigError(f"data.path must name the image folder for data.kind={self.kind!r}")
        if self.kind == "folder" and self.k != 1:
            raise ConfigError(f"data.k={self.k}: a flat folder holds one photo per subject, so k must be 1")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"data.cond_dropout={self.cond_dropout} must be in [0, 1)")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ConfigError(f"data.flip_p={self.flip_p} must be in [0, 1]")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.identities < 0 or self.identity_start < 0:
            raise ConfigError(f"data.identities={self.identities} and data.identity_start={self.identity_start} must be >= 0")
        if self.identities and self.kind != "world":
            raise ConfigError(f"data.identities={self.identities}: an identity bank exists only for data.kind='world'")
        if not 0.0 <= self.bank_fraction <= 1.0:
            raise ConfigError(f"data.bank_fraction={self.bank_fraction} must be in [0, 1]")
        if not self.token or any(c.isspace() for c in self.token):
            raise ConfigError(f"data.token={self.token!r} must be one non-empty word")


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))


class _Photos:
    """Photo files read at one resolution: decoded once when built (a damaged file raises ImageLoadError naming it)
    and kept as uint8 (``preload``), or decoded again each time one is sampled."""

    def __init__(self, files: Sequence[Path], resolution: int, preload: bool):
        self.files, self.resolution = list(files), resolution
        kept = []
        for f in self.files:  # one at a time: without preload only the check stays, not the pixels
            image = load_image(f, size=resolution)  # (3, H, W) in [-1, 1]
            if preload:
                kept.append(((image + 1.0) * 127.5).round().to(torch.uint8))
        self.cache = torch.stack(kept) if preload else None  # (n, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:  # the same float32 values load_image gives (it divides the same uint8 values)
            return self.cache[i].float() / 127.5 - 1.0
        return load_image(self.files[i], size=self.resolution)


def names_digest(files: Sequence[Path]) -> str:
    """A digest of a photo folder's file names in their (sorted) order: a photo's index is its identity, so targets
    pre-optimized on one folder fit another only if this agrees."""
    import hashlib

    return hashlib.sha256("\n".join(f.name for f in files).encode()).hexdigest()[:16]


def _flip(image: torch.Tensor, rng: np.random.Generator, p: float) -> torch.Tensor:
    return image.flip(-1) if rng.random() < p else image


class SubjectFolderDataset(Dataset):
    """DreamBench's layout: ``<path>/<subject>/<photo>``; see the module docstring."""

    def __init__(self, cfg: DataConfig, resolution: int, size: int):
        root = Path(cfg.path)
        if not root.is_dir():
            raise ConfigError(f"data.path={cfg.path!r} is not a folder")
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise ConfigError(f"data.path={cfg.path!r} holds no subject folders (DreamBench's layout: a folder of photos per subject)")
        if cfg.subjects:
            found = {d.name: d for d in folders}
            missing = [name for name in cfg.subjects if name not in found]
            if missing:
                raise ConfigError(f"data.subjects: {missing[0]!r} is not a subject folder of {cfg.path} (it has: {', '.join(found)})")
            folders = [found[name] for name in cfg.subjects]
        table = parse_prompts_file(cfg.classes_file).classes if cfg.classes_file else {}
        need = cfg.k + (1 if cfg.mode == "cross" else 0)
        self.names, self.classes, self.photos = [], [], []
        for folder in folders:
            files = _image_files(folder)
            if len(files) < need:
                raise ImageLoadError(f"subject folder {folder} holds {len(files)} photo(s); data.k={cfg.k} with data.mode={cfg.mode} "
                                     f"needs {need} ({cfg.k} reference(s){' and a target' if cfg.mode == 'cross' else ''})")
            if table and folder.name not in table and not cfg.class_name:
                raise ConfigError(f"subject {folder.name!r} is not in the class table {cfg.classes_file} (set data.class_name for it)")
            self.names.append(folder.name)
            self.classes.append(table.get(folder.name) or cfg.class_name or folder.name.replace("_", " "))
            self.photos.append(_Photos(files, resolution, cfg.preload))
        self.cfg, self.size = cfg, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.cfg.seed, index, 17])
        s = int(rng.integers(len(self.photos)))
        photos = self.photos[s]
        order = rng.permutation(len(photos)).tolist()
        refs = order[: self.cfg.k]
        target = order[self.cfg.k] if self.cfg.mode == "cross" else refs[0]
        return {
            "references": torch.stack([photos[i] for i in refs]),  # (k, 3, H, W)
            "target": _flip(photos[target], rng, self.cfg.flip_p),  # (3, H, W)
            "prompt": instance_prompt(self.classes[s], self.cfg.token),
            "class_name": self.classes[s],
            "identity": s,  # the subject folder's index (sorted names); no pre-optimized bank is made of these
            "in_bank": False,
        }


class PhotoFolderDataset(Dataset):
    """A flat folder of single-subject photos, optionally captioned by ``<photo>.txt``; see the module docstring."""

    def __init__(self, cfg: DataConfig, resolution: int, size: int):
        root = Path(cfg.path)
        if not root.is_dir():
            raise ConfigError(f"data.path={cfg.path!r} is not a folder")
        files = _image_files(root)
        if not files:
            raise ImageLoadError(f"{root}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.prompts, self.classes = [], []
        for f in files:
            caption = f.with_suffix(".txt")
            if caption.is_file():
                text = " ".join(caption.read_text(encoding="utf-8").split())
                if not text:
                    raise ConfigError(f"caption {caption} is empty")
                self.prompts.append(text)
            elif cfg.class_name:
                self.prompts.append(instance_prompt(cfg.class_name, cfg.token))
            else:
                raise ConfigError(f"{f} has no caption ({caption.name}) and data.class_name is not set: give one or the other")
            self.classes.append(cfg.class_name or None)
        self.photos = _Photos(files, resolution, cfg.preload)
        self.cfg, self.size = cfg, size
        self._order: tuple[int, list[int]] | None = None  # (epoch, its shuffled order), the last one used

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int) -> list[int]:
        """The photos' order in ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.cfg.seed, epoch, 23]).permutation(len(self.photos)).tolist())
        return self._order[1]

    def __getitem__(self, index: int) -> dict:
        epoch, position = divmod(index, len(self.photos))
        i = self.order(epoch)[position]
        image = self.photos[i]
        return {
            "references": image[None],  # (1, 3, H, W)
            "target": _flip(image, np.random.default_rng([self.cfg.seed, index, 29]), self.cfg.flip_p),
            "prompt": self.prompts[i],
            "class_name": self.classes[i],
            "identity": i,  # the photo's index (sorted file names): HyperDreamBooth's pre-optimized target of it
            "in_bank": True,
        }


def build_dataset(cfg: DataConfig, resolution: int, size: int) -> Dataset:
    """The dataset ``cfg`` names, its images at ``resolution``; ``size``: how many samples a run draws (indices
    ``0 … size − 1``)."""
    if cfg.kind == "world":
        bank = bank_identities(cfg.identities, cfg.identity_start) if cfg.identities else None
        return PersonalizationPairDataset("train", size=size, k=cfg.k, mode=cfg.mode, resolution=resolution, seed=cfg.seed, token=cfg.token,
                                          identities=bank, bank_fraction=cfg.bank_fraction)
    if cfg.kind == "dreambench":
        return SubjectFolderDataset(cfg, resolution, size)
    return PhotoFolderDataset(cfg, resolution, size)


class _Indexed(Dataset):
    """Each sample with its index (the key of its noise, timestep and dropout draws)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "index": i}


def collate(items: list[dict]) -> dict:
    """Samples → ``{"references": (N, k, 3, H, W), "target": (N, 3, H, W), "prompt": [N], "class_name": [N],
    "index": (N,)}``, and where the samples know their subject (the world) ``"identity": (N,)`` int64 and
    ``"in_bank": (N,)`` bool."""
    out = {
        "references": torch.stack([i["references"] for i in items]),
        "target": torch.stack([i["target"] for i in items]),
        "prompt": [i["prompt"] for i in items],
        "class_name": [i["class_name"] for i in items],
        "index": torch.tensor([i["index"] for i in items]),
    }
    if all("identity" in i for i in items):
        out["identity"] = torch.tensor([int(i["identity"]) for i in items], dtype=torch.int64)
        out["in_bank"] = torch.tensor([bool(i.get("in_bank", False)) for i in items])
    return out


def batches(dataset: Dataset, indices: Sequence[int], batch_size: int, cfg: DataConfig, progress: bool = True) -> Iterator[dict]:
    """Batches of ``batch_size`` samples, the dataset's ``indices`` in order (this process's share of the run)."""
    dataset, workers = _Indexed(dataset), cfg.num_workers
    if cfg.kind == "world" and cfg.prerender:
        dataset, workers = PrerenderedDataset(dataset, indices, workers=workers, progress=progress), 0
    loader = DataLoader(dataset, batch_size=batch_size, sampler=list(indices), num_workers=workers, collate_fn=collate,
                        prefetch_factor=4 if workers else None)
    return iter(loader)
