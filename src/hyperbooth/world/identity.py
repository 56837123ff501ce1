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

#: The words a caption uses for the colours, patterns and features (real text-to-image models know such words;
#: the base model learns them from captions that describe some of its training subjects).
COLOR_NAMES: dict[tuple[int, int, int], str] = dict(zip(SECONDARY_COLORS, (
    "yellow", "sky blue", "green", "orange", "navy", "cream", "black", "brown", "teal", "pink", "red", "purple")))
PATTERN_WORDS: dict[str, str] = {"solid": "", "stripes": "stripes", "dots": "dots", "checks": "checks",
                                 "zigzag": "zigzags", "diagonal": "diagonal stripes"}
FEATURE_WORDS: dict[str, str] = {"none": "", "band": "a band", "patch": "a patch", "button": "a button"}
#: How much a caption says about its subject: nothing, its main colour, or its colours, pattern and feature.
DETAIL_LEVELS: tuple[str, ...] = ("none", "color", "full")
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


def describe(identity: Identity, detail: str = "full") -> tuple[str, str]:
    """Words for ``identity``: ``(colour, details)``, e.g. ``("yellow", "with sky blue stripes and a sky blue patch")``.

    ``detail`` is one of :data:`DETAIL_LEVELS`; ``"none"`` gives ``("", "")``, ``"color"`` only the main colour.
    The colour word goes before the class noun and the details after it (:func:`~hyperbooth.world.contexts.prompt_for`).
    """
    if detail not in DETAIL_LEVELS:
        raise ConfigError(f"unknown detail {detail!r}; choose one of {', '.join(DETAIL_LEVELS)}")
    if detail == "none":
        return "", ""
    color = COLOR_NAMES[identity.primary]
    if detail == "color":
        return color, ""
    second = COLOR_NAMES[identity.secondary]
    parts = []
    if PATTERN_WORDS[identity.pattern]:
        parts.append(f"{second} {PATTERN_WORDS[identity.pattern]}")
    if FEATURE_WORDS[identity.feature]:
        article, noun = FEATURE_WORDS[identity.feature].split(" ", 1)
        parts.append(f"{article} {second} {noun}")
    return color, ("with " + " and ".join(parts)) if parts else ""
