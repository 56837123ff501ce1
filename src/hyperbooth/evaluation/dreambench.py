"""DreamBench's data (Ruiz et al., "DreamBooth", CVPR 2023): the prompts file and the folders of subject photos.

``prompts_and_classes.txt`` holds three parts, in this order (the layout of the official repository)::

    Classes

    subject_name,class
    backpack,backpack
    ...

    Prompts

    Object Prompts

    prompt_list = [
    'a {0} {1} in the jungle'.format(unique_token, class_token),
    ...
    ]

    Live Subject Prompts

    prompt_list = [
    ...
    ]

``{0}`` is the unique token (``sks``), ``{1}`` the class noun. Live subjects are DreamBench's dogs and cats; every
other subject is an object. The subjects folder holds one folder of photos per subject, named as in the class table.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hyperbooth.errors import ConfigError, ImageLoadError
from hyperbooth.images import load_image

log = logging.getLogger(__name__)

#: DreamBench's live subjects (9 of 30) are its dogs and cats; they get the live-subject prompts.
LIVE_CLASSES: tuple[str, ...] = ("cat", "dog")
KINDS: tuple[str, ...] = ("object", "live")
PROMPTS_FILE = "prompts_and_classes.txt"

_PROMPT_LINE = re.compile(r"""^(['"])(?P<template>.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?$""")


@dataclass(frozen=True)
class EvalPrompt:
    """One DreamBench prompt template: ``{0}`` the unique token, ``{1}`` the class noun."""

    template: str
    index: int = 0  # position in its list (object or live)

    def personalized(self, token: str, class_name: str) -> str:
        """The prompt a personalization method is given: ``"a sks backpack in the jungle"``."""
        return _squash(self.template.format(token, class_name))

    def class_prompt(self, class_name: str) -> str:
        """The prompt without the unique token (the floor's prompt, and the text CLIP-T compares with)."""
        return _squash(self.template.format("", class_name))


def _squash(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class PromptSet:
    """What ``prompts_and_classes.txt`` holds: the subject → class table and the prompts of each kind."""

    path: Path
    classes: dict[str, str]  # subject name → class noun, in file order
    object_prompts: tuple[EvalPrompt, ...]
    live_prompts: tuple[EvalPrompt, ...]

    def kind_of(self, subject: str) -> str:
        """``"live"`` for DreamBench's dogs and cats, ``"object"`` for the rest."""
        return kind_of_class(self.classes[subject])

    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]:
        if kind not in KINDS:
            raise ConfigError(f"unknown subject kind {kind!r}; choose one of {', '.join(KINDS)}")
        return self.object_prompts if kind == "object" else self.live_prompts


def kind_of_class(class_name: str) -> str:
    return "live" if class_name in LIVE_CLASSES else "object"


def parse_prompts_file(path: str | os.PathLike) -> PromptSet:
    """Read DreamBench's ``prompts_and_classes.txt``; a file of another layout raises :class:`ConfigError` naming it
    and the first line that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompts file {path} cannot be read as text ({type(e).__name__}: {e})") from None

    def bad(lineno: int, why: str) -> ConfigError:
        return ConfigError(
            f"{path}:{lineno}: not DreamBench's prompts_and_classes.txt layout ({why}); expected a 'Classes' table "
            "of subject_name,class rows, then 'Object Prompts' and 'Live Subject Prompts' lists of "
            "'a {0} {1} ...'.format(unique_token, class_token) lines"
        )

    classes: dict[str, str] = {}
    prompts: dict[str, list[EvalPrompt]] = {"object": [], "live": []}
    section = None  # "classes", "prompts", "object", "live"
    in_list = False
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        lower = line.lower()
        if in_list:
            if line == "]":
                in_list = False
                continue
            match = _PROMPT_LINE.match(line)
            if not match:
                raise bad(lineno, f"prompt line {line!r} is not a quoted template with .format(unique_token, class_token)")
            template = match.group("template")
            if template.count("{0}") != 1 or template.count("{1}") != 1 or re.search(r"\{(?![01]\})", template):
                raise bad(lineno, f"template {template!r} must hold {{0}} and {{1}} once each and no other braces")
            prompts[section].append(EvalPrompt(template, index=len(prompts[section])))
        elif lower == "classes":
            section = "classes"
        elif lower == "prompts":
            section = "prompts"
        elif lower == "object prompts":
            section = "object"
        elif lower in ("live subject prompts", "live prompts"):
            section = "live"
        elif section in ("object", "live") and re.fullmatch(r"prompt_list\s*=\s*\[", line):
            if prompts[section]:
                raise bad(lineno, f"a second prompt list for {section} subjects")
            in_list = True
        elif section == "classes" and lower.replace(" ", "") == "subject_name,class":
            continue
        elif section == "classes" and line.count(",") == 1:
            name, class_name = (part.strip() for part in line.split(","))
            if not name or not class_name:
                raise bad(lineno, f"class row {line!r} has an empty field")
            if name in classes:
                raise bad(lineno, f"subject {name!r} is listed twice")
            classes[name] = class_name
        else:
            raise bad(lineno, f"unexpected line {line!r}")
    if in_list:
        raise bad(len(lines), "a prompt_list is not closed with ']'")
    if not classes:
        raise bad(1, "no subject_name,class table found")
    for kind, name in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if not prompts[kind]:
            raise bad(1, f"no {name!r} list found")
    return PromptSet(path, classes, tuple(prompts["object"]), tuple(prompts["live"]))


# -- subjects ---------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One subject: its reference photos ``(k, 3, H, W)`` in [-1, 1], class noun and kind (object / live).

    ``identity_seed`` is set for DreamBench-World identities (the world's oracles judge against it).
    """

    name: str
    class_name: str
    kind: str
    images: torch.Tensor
    files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # files in the folder that were not readable images
    identity_seed: int | None = None
    meta: dict = field(default_factory=dict)


def load_subject(folder: str | os.PathLike, class_name: str, kind: str | None = None, size: int = 512, name: str | None = None) -> Subject:
    """Every photo in ``folder`` (centre-cropped, resized to ``size``). A file that is not a readable image is skipped
    with a warning naming it; a folder left with no image raises :class:`ImageLoadError` naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageLoadError(f"subject folder {folder} does not exist")
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise ImageLoadError(f"subject folder {folder} holds no images")
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(load_image(f, size=size))
        except ImageLoadError as e:
            log.warning("skipping %s: %s", f, e)
            skipped.append(str(f))
            continue
        kept.append(str(f))
    if not images:
        raise ImageLoadError(f"subject folder {folder} holds no readable images (skipped: {', '.join(Path(s).name for s in skipped)})")
    return Subject(
        name=name or folder.name,
        class_name=class_name,
        kind=kind or kind_of_class(class_name),
        images=torch.stack(images),
        files=tuple(kept),
        skipped=tuple(skipped),
    )


def load_subjects(dataset: str | os.PathLike, prompt_set: PromptSet, names: tuple[str, ...] | list[str] = (), size: int = 512) -> list[Subject]:
    """The subjects of a DreamBench-layout folder (one folder per subject named in the class table), in table order;
    ``names`` picks some of them."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise ConfigError(f"subjects folder {str(dataset)!r} does not exist")
    for name in names:
        if name not in prompt_set.classes:
            raise ConfigError(f"subject {name!r} is not in the class table of {prompt_set.path} (it has: {', '.join(prompt_set.classes)})")
    chosen = list(names) if names else list(prompt_set.classes)
    return [load_subject(dataset / name, prompt_set.classes[name], prompt_set.kind_of(name), size=size, name=name) for name in chosen]
