"""Training data from the world, deterministic by index: sample ``i`` of a dataset is fully defined by
``(seed, i)``, so any worker, any machine and any resumed run sees the same sample for the same index."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from hyperbooth.errors import ConfigError
from hyperbooth.world import contexts as ctx
from hyperbooth.world.identity import describe, identity_class, make_identity
from hyperbooth.world.render import check_resolution, render_identity, sample_pose
from hyperbooth.world.splits import check_split, identity_seeds, split_of

BACKGROUND_PROB = 0.85
RECOLOR_PROB = 0.25
ACCESSORY_PROB = 0.15


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


def labels_of(class_name: str, context: ctx.Context) -> dict[str, int]:
    """Label indices of an image, in the vocabularies of :mod:`contexts` (what the oracles predict)."""
    return {
        "class": ctx.CLASSES.index(class_name),
        "background": ctx.BACKGROUND_NAMES.index(context.background or "none"),
        "recolor": ctx.RECOLORS.index(context.recolor or "none"),
        "accessory": ctx.ACCESSORIES.index(context.accessory or "none"),
    }


def sample_identity(rng: np.random.Generator, split: str) -> int:
    while True:
        seed = int(rng.integers(0, 2**31 - 1))
        if split_of(seed) == split:
            return seed


def sample_context(rng: np.random.Generator, class_name: str, split: str, recolor: bool = True, accessory: bool = True) -> ctx.Context:
    """A random context; in the train split the held-out (class, background) combinations are never drawn."""
    names = list(ctx.BACKGROUNDS)
    while True:
        background = names[rng.integers(len(names))] if rng.random() < BACKGROUND_PROB else None
        color = list(ctx.RECOLOR_WORDS)[rng.integers(len(ctx.RECOLOR_WORDS))] if recolor and rng.random() < RECOLOR_PROB else None
        acc = "red_hat" if accessory and rng.random() < ACCESSORY_PROB else None
        context = ctx.Context(background=background, recolor=color, accessory=acc)
        if split != "train" or not ctx.is_heldout_context(class_name, context):
            return context


def check_describe(describe_color: float, describe_full: float) -> None:
    """Caption-description probabilities: each in [0, 1], their sum at most 1."""
    for name, p in (("describe_color", describe_color), ("describe_full", describe_full)):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}")
    if describe_color + describe_full > 1.0:
        raise ConfigError(f"describe_color + describe_full must be at most 1, got {describe_color} + {describe_full}")


class BaseSampleDataset(Dataset):
    """(image, prompt) samples for the base model: random identities of a split in random contexts.

    The prompt names the class and the context; with probability ``describe_color`` it also names the subject's
    main colour, with probability ``describe_full`` its colours, pattern and feature too ("a yellow ball with navy
    dots in the snow"), as real captions describe what they show.
    """

    def __init__(self, split: str = "train", size: int = 100_000, resolution: int = 32, seed: int = 0,
                 describe_color: float = 0.0, describe_full: float = 0.0):
        self.split, self.size, self.resolution, self.seed = check_split(split), size, check_resolution(resolution), seed
        if size < 1:
            raise ConfigError(f"dataset size must be positive, got {size}")
        check_describe(describe_color, describe_full)
        self.describe_color, self.describe_full = describe_color, describe_full

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 11])
        identity = make_identity(sample_identity(rng, self.split))
        context = sample_context(rng, identity.class_name, self.split)
        image = render_identity(identity, context, sample_pose(rng), self.resolution, scene_seed=int(rng.integers(2**31)))
        paraphrase = int(rng.integers(len(ctx.TEMPLATES)))
        detail = "none"
        if self.describe_color or self.describe_full:
            u = rng.random()
            detail = "full" if u < self.describe_full else "color" if u < self.describe_full + self.describe_color else "none"
        color, details = describe(identity, detail)
        return {
            "image": to_tensor(image),
            "prompt": ctx.prompt_for(identity.class_name, context, paraphrase=paraphrase, color=color, details=details),
            "identity": identity.seed,
            "labels": labels_of(identity.class_name, context),
        }


class PersonalizationPairDataset(Dataset):
    """(k reference images of an identity, a target image of it, the rare-token prompt of the target, its class).

    - ``mode="cross"``: references in random backgrounds (own colours, no hat) and poses; the target in a new
      random context and pose.
    - ``mode="same"``: the target is reference 0 itself, with the prompt of its context (the papers' single-image
      training sets).

    ``identities``: a fixed bank of identity seeds (e.g. the ones HyperDreamBooth pre-optimized, :func:`bank_identities`);
    a sample draws its subject from the bank with probability ``bank_fraction``, else a fresh identity of the split.
    Every sample says which identity it shows (``identity``) and whether it came from the bank (``in_bank``).
    """

    MODES = ("cross", "same")

    def __init__(self, split: str = "train", size: int = 100_000, k: int = 1, mode: str = "cross", resolution: int = 32, seed: int = 0,
                 token: str = ctx.RARE_TOKEN, identities: list[int] | None = None, bank_fraction: float = 1.0):
        if identities is not None and not len(identities):
            raise ConfigError("the identity bank is empty")
        if not 0.0 <= bank_fraction <= 1.0:
            raise ConfigError(f"bank_fraction={bank_fraction!r} must be in [0, 1]")
        self.identities = None if identities is None else [int(i) for i in identities]
        self.bank_fraction = float(bank_fraction)
        if mode not in self.MODES:
            raise ConfigError(f"unknown pair mode {mode!r}; choose one of {', '.join(self.MODES)}")
        if k < 1:
            raise ConfigError(f"k (reference images) must be at least 1, got {k}")
        self.split, self.size, self.k, self.mode = check_split(split), size, k, mode
        self.resolution, self.seed, self.token = check_resolution(resolution), seed, token

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 13])
        in_bank = False
        if self.identities is not None:
            bank = np.random.default_rng([self.seed, index, 17])  # its own stream: the draws below stay as they were
            in_bank = bool(bank.random() < self.bank_fraction)
        seed = self.identities[int(bank.integers(len(self.identities)))] if in_bank else sample_identity(rng, self.split)
        identity = make_identity(seed)
        ref_contexts = [sample_context(rng, identity.class_name, self.split, recolor=False, accessory=False) for _ in range(self.k)]
        refs = [render_identity(identity, c, sample_pose(rng), self.resolution, scene_seed=int(rng.integers(2**31))) for c in ref_contexts]
        if self.mode == "same":
            target, context = refs[0], ref_contexts[0]
        else:
            context = sample_context(rng, identity.class_name, self.split)
            target = render_identity(identity, context, sample_pose(rng), self.resolution, scene_seed=int(rng.integers(2**31)))
        return {
            "references": torch.stack([to_tensor(r) for r in refs]),  # (k, 3, H, W)
            "target": to_tensor(target),  # (3, H, W)
            "prompt": ctx.prompt_for(identity.class_name, context, token=self.token, paraphrase=int(rng.integers(len(ctx.TEMPLATES)))),
            "class_name": identity.class_name,
            "identity": identity.seed,
            "in_bank": in_bank,
            "labels": labels_of(identity.class_name, context),
        }


def bank_identities(num: int, start: int = 0, split: str = "train") -> list[int]:
    """A fixed bank of ``num`` identity seeds of ``split`` (the first ones from ``start``): the training identities
    that HyperDreamBooth pre-optimizes and then trains its hypernetwork on."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(f"identity bank size {num!r} must be a positive integer")
    return list(identity_seeds(split, num, start))


def _to_uint8(item: dict) -> dict:
    """Image tensors in [-1, 1] → uint8 numpy arrays (exact: they were made from uint8 renders; numpy, not tensors,
    so that worker processes send bytes rather than one shared-memory file descriptor per image)."""
    return {k: ((v + 1.0) * 127.5).round().to(torch.uint8).numpy() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in item.items()}


class _Uint8View(Dataset):
    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        return _to_uint8(self.dataset[self.indices[position]])


class PrerenderedDataset(Dataset):
    """A world dataset rendered once, ahead of training, by ``workers`` processes and then served from memory.

    Indexed like the wrapped dataset (only ``indices`` are rendered); samples are identical to the wrapped
    dataset's, images are held as uint8. Why: on 2 CPU cores a render process working beside the training step
    takes a core from torch's threads (measured 1.5 s vs 1.0 s per base-model step of 32); rendering everything
    first on both cores costs ~8 % of the run instead of ~50 %.
    """

    def __init__(self, dataset: Dataset, indices, workers: int = 2, progress: bool = True, desc: str = "render"):
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        indices = list(indices)
        self.size = len(dataset)
        self.position = {index: position for position, index in enumerate(indices)}
        self.fields: dict[str, list] = {}
        loader = DataLoader(_Uint8View(dataset, indices), batch_size=256, num_workers=workers, collate_fn=list)
        with tqdm(total=len(indices), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for items in loader:
                for item in items:
                    for key, value in item.items():
                        self.fields.setdefault(key, []).append(value)
                bar.update(len(items))
        for key, values in self.fields.items():
            if values and isinstance(values[0], np.ndarray):
                self.fields[key] = torch.from_numpy(np.stack(values))  # (n, ...) uint8 images: one block

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        position = self.position.get(index)
        if position is None:
            raise IndexError(f"index {index} was not prerendered")
        item = {}
        for key, values in self.fields.items():
            value = values[position]
            item[key] = value.float() / 127.5 - 1.0 if torch.is_tensor(value) and value.dtype == torch.uint8 else value
        return item
