"""DreamBench-World: procedural subjects in DreamBench's contexts, its oracles and its base model."""

from hyperbooth.world.contexts import (
    ACCESSORIES,
    BACKGROUND_NAMES,
    BACKGROUNDS,
    CLASSES,
    RECOLORS,
    Context,
    is_heldout_context,
    prompt_for,
)
from hyperbooth.world.identity import Identity, count_identities, identity_class, make_identity
from hyperbooth.world.render import Pose, render, render_identity, sample_pose
from hyperbooth.world.splits import identity_seeds, split_of

__all__ = [
    "ACCESSORIES",
    "BACKGROUNDS",
    "BACKGROUND_NAMES",
    "CLASSES",
    "RECOLORS",
    "Context",
    "Identity",
    "Pose",
    "count_identities",
    "identity_class",
    "identity_seeds",
    "is_heldout_context",
    "make_identity",
    "prompt_for",
    "render",
    "render_identity",
    "sample_pose",
    "split_of",
]
