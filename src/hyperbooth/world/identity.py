"""Identities: an integer seed → a subject (class, shape parameters, two colours, a pattern, a small feature).

Every choice is drawn from a small discrete set, so identities are countable (:func:`count_identities`) and two
random identities of one class differ visibly even at 32x32. Seeds map to parameters through numpy's PCG64, seeded
with integers only: the same seed gives the same subject on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hyperbooth.errors import ConfigError
from hyperbooth.world.contexts import CLASSES, check_class

#: Primary colours (RGB). Red and purple are left out: they are what the recolour contexts turn a subject into.
PRIMARY_COLORS: tuple[tuple[int, int, int], ...] = (
    (240, 200, 40),   # yellow
    (40, 150, 230),   # sky blue
    (30, 160, 80),    # green
    (245, 130, 30),   # orange
    (20, 40, 140),    # navy
    (250, 245, 235),  # cream
    (40, 40, 45),     # black
    (120, 75, 40),    # brown
    (30, 190, 180),   # teal
    (255, 150, 190),  # pink
)
SECONDARY_COLORS: tuple[tuple[int, int, int], ...] = PRIMARY_COLORS + ((230, 40, 40), (140, 60, 200))
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks", "zigzag", "diagonal")
FEATURES: tuple[str, ...] = ("none", "band", "patch", "button")
SHAPE_LEVELS = 5  # each shape parameter takes one of 5 values
SHAPE_PARAMS = 3  # three shape parameters per class


@dataclass(frozen=True)
class Identity:
    seed: int
    class_name: str
    shape: tuple[float, float, float]  # each in [0, 1]: the class's silhouette parameters
    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    pattern: str
    feature: str


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"identity seed must be an integer, got {seed!r}")
    if seed < 0:
        raise ConfigError(f"identity seed must be non-negative, got {seed!r}")
    return int(seed)


def identity_class(seed: int) -> str:
    """The class an identity seed belongs to."""
    return CLASSES[int(np.random.default_rng([check_seed(seed), 1]).integers(len(CLASSES)))]


def make_identity(seed: int, class_name: str | None = None) -> Identity:
    """The subject of ``seed`` (its own class unless ``class_name`` overrides it)."""
    seed = check_seed(seed)
    class_name = check_class(class_name) if class_name is not None else identity_class(seed)
    rng = np.random.default_rng([seed, 2])
    shape = tuple(float(v) / (SHAPE_LEVELS - 1) for v in rng.integers(SHAPE_LEVELS, size=SHAPE_PARAMS))
    primary = int(rng.integers(len(PRIMARY_COLORS)))
    secondary = int(rng.integers(len(SECONDARY_COLORS) - 1))
    if SECONDARY_COLORS[secondary] == PRIMARY_COLORS[primary]:
        secondary = len(SECONDARY_COLORS) - 1  # never the primary colour itself
    return Identity(
        seed=seed,
        class_name=class_name,
        shape=shape,  # type: ignore[arg-type]
        primary=PRIMARY_COLORS[primary],
        secondary=SECONDARY_COLORS[secondary],
        pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
        feature=FEATURES[int(rng.integers(len(FEATURES)))],
    )


def count_identities() -> int:
    """Distinct identities: classes × shapes × primary × secondary (≠ primary) × patterns × features."""
    shapes = SHAPE_LEVELS**SHAPE_PARAMS
    return len(CLASSES) * shapes * len(PRIMARY_COLORS) * (len(SECONDARY_COLORS) - 1) * len(PATTERNS) * len(FEATURES)
