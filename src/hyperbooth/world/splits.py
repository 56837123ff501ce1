"""Splits by identity seed: train / val / test (about 90 / 5 / 5 %), fixed by integer hashing of the seed."""

from __future__ import annotations

from collections.abc import Iterator

from hyperbooth.errors import ConfigError
from hyperbooth.world.identity import check_seed

SPLITS = ("train", "val", "test")
_MASK = (1 << 64) - 1


def _mix(seed: int) -> int:
    """SplitMix64's finalizer: a well-mixed 64-bit integer from the seed (pure integer arithmetic)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def split_of(seed: int) -> str:
    bucket = _mix(check_seed(seed)) % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def identity_seeds(split: str, n: int, start: int = 0) -> Iterator[int]:
    """The first ``n`` seeds ≥ ``start`` that belong to ``split``."""
    check_split(split)
    seed, found = start, 0
    while found < n:
        if split_of(seed) == split:
            yield seed
            found += 1
        seed += 1
