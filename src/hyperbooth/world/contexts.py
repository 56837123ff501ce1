"""DreamBench-World's vocabulary: subject classes, contexts from DreamBench's prompt list, and prompts.

Context phrases keep DreamBench's wording (``../shared/dreambench/dataset/prompts_and_classes.txt``). A prompt puts
an optional recolour before the subject and the accessory and background after it:

    "a red sks toy wearing a red hat in the snow"
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperbooth.errors import ConfigError
from hyperbooth.prompts import RARE_TOKEN  # noqa: F401  (re-exported: the world's prompts name a subject with it, ctx.RARE_TOKEN)

CLASSES: tuple[str, ...] = ("backpack", "vase", "toy", "ball")

#: short name → DreamBench phrase
BACKGROUNDS: dict[str, str] = {
    "snow": "in the snow",
    "beach": "on the beach",
    "jungle": "in the jungle",
    "wooden_floor": "on top of a wooden floor",
    "pink_fabric": "on top of pink fabric",
    "city": "with a city in the background",
    "water": "floating on top of water",
    "mountain": "with a mountain in the background",
    "blue_house": "with a blue house in the background",
    "purple_rug": "on top of a purple rug in a forest",
    "wheat_field": "with a wheat field in the background",
    "cobblestone": "on a cobblestone street",
}
RECOLOR_WORDS: dict[str, str] = {"red": "red", "purple": "purple"}
ACCESSORY_PHRASES: dict[str, str] = {"red_hat": "wearing a red hat"}

#: Label vocabularies (index 0 = none), as the oracles' heads order them.
BACKGROUND_NAMES: tuple[str, ...] = ("none", *BACKGROUNDS)
RECOLORS: tuple[str, ...] = ("none", *RECOLOR_WORDS)
ACCESSORIES: tuple[str, ...] = ("none", *ACCESSORY_PHRASES)

#: The context types a prompt can belong to (a combination belongs to each of its parts; none named: ``plain``).
CONTEXT_TYPES: tuple[str, ...] = ("plain", "background", "recolor", "accessory")

TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "a picture of {}")


def _check(value: str | None, allowed, what: str) -> None:
    if value is not None and value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")


def check_class(class_name: str) -> str:
    _check(class_name, CLASSES, "class")
    return class_name


@dataclass(frozen=True)
class Context:
    """Where and how a subject appears; ``None`` means plain (neutral backdrop, own colour, no accessory)."""

    background: str | None = None
    recolor: str | None = None
    accessory: str | None = None

    def __post_init__(self) -> None:
        _check(self.background, BACKGROUNDS, "background")
        _check(self.recolor, RECOLOR_WORDS, "recolor")
        _check(self.accessory, ACCESSORY_PHRASES, "accessory")

    @property
    def types(self) -> tuple[str, ...]:
        """The :data:`CONTEXT_TYPES` this context belongs to: each attribute it names, else ``("plain",)``."""
        named = tuple(t for t, v in (("background", self.background), ("recolor", self.recolor), ("accessory", self.accessory)) if v is not None)
        return named or ("plain",)

    @classmethod
    def parse(cls, name: str) -> Context:
        """One context from a short name: a background, a recolour or an accessory (``"snow"``, ``"red"``, ``"red_hat"``);
        ``"plain"`` for none; ``+`` joins several (``"red+snow"``)."""
        fields: dict[str, str] = {}
        for part in name.split("+"):
            if part == "plain":
                continue
            for key, vocab in (("background", BACKGROUNDS), ("recolor", RECOLOR_WORDS), ("accessory", ACCESSORY_PHRASES)):
                if part in vocab:
                    fields[key] = part
                    break
            else:
                names = ["plain", *BACKGROUNDS, *RECOLOR_WORDS, *ACCESSORY_PHRASES]
                raise ConfigError(f"unknown context {part!r}; choose from: {', '.join(names)}")
        return cls(**fields)


def prompt_for(class_name: str, context: Context = Context(), token: str | None = None, paraphrase: int = 0,
               color: str = "", details: str = "") -> str:
    """The prompt for ``class_name`` in ``context``; ``token`` (e.g. ``"sks"``) gives the personalization form.

    ``color`` and ``details`` describe the subject (:func:`~hyperbooth.world.identity.describe`); a recolour
    context's colour takes the place of ``color``: ``"a yellow ball with navy dots in the snow"``.
    """
    check_class(class_name)
    words = ["a"]
    if context.recolor:
        words.append(RECOLOR_WORDS[context.recolor])
    elif color:
        words.append(color)
    if token:
        words.append(token)
    words.append(class_name)
    if details:
        words.append(details)
    if context.accessory:
        words.append(ACCESSORY_PHRASES[context.accessory])
    if context.background:
        words.append(BACKGROUNDS[context.background])
    return TEMPLATES[paraphrase % len(TEMPLATES)].format(" ".join(words))


def is_heldout_context(class_name: str, context: Context) -> bool:
    """Held-out (class, background) combinations, never in base-model training: one background per class
    (4 of 48 combinations)."""
    if context.background is None:
        return False
    names = list(BACKGROUNDS)
    return names.index(context.background) == (5 * CLASSES.index(check_class(class_name)) + 2) % len(names)
