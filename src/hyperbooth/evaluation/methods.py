"""What ``hyperbooth eval`` evaluates: ``method.generate(subject, prompt, seeds)`` → images.

A :class:`Method` maps (a subject's reference photos, a DreamBench prompt) to images; write a subclass to evaluate
anything else (``run_eval(cfg, ..., method=...)``). The ones here sample a
:class:`~hyperbooth.evaluation.backends.Backend`; ``method.kind`` in the config picks one:

- ``base`` (:class:`BaseModelMethod`): the floor, no personalization: the base model with the class prompt
  (``"a backpack in the jungle"``), with CFG.
- ``lora_folder`` (:class:`LoRAFolderMethod`): ``<folder>/<subject name>.safetensors`` per subject (e.g. DreamBooth-LoRA
  fine-tuned per subject elsewhere), diffusers or kohya layout.
- ``personalizer`` (:class:`PersonalizerMethod`): any registered method's folder (``method.path``, loaded by
  :func:`hyperbooth.methods.load`: the method is read from the folder).
- a registered method's name (``hyperbooth.methods.METHODS``, e.g. ``dreambooth-lora``): with ``method.path`` its
  folder (of that method), else built from its config (``method.options``, the fields of its config class) — for a
  method with nothing trained ahead, such as the per-subject fine-tune.

Personalized methods sample the rare-token prompt (``"a sks backpack in the jungle"``) with the subject's LoRA, which
they compute once per subject (``personalize``) through the Personalizer interface, timed as the world table times it
(:func:`hyperbooth.world.personalization.personalize_subjects`: after an untimed warm-up call, or by the method's own
clock, e.g. a fine-tune's ``seconds_per_subject``). A new method needs no change here.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hyperbooth.config import config_from_dict
from hyperbooth.errors import CheckpointError, ConfigError, LoRAFileError
from hyperbooth.evaluation.backends import Backend, Guidance
from hyperbooth.evaluation.dreambench import EvalPrompt, Subject
from hyperbooth.lora.io import load_lora
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.methods import METHODS, Personalizer, get, load
from hyperbooth.world.contexts import RARE_TOKEN
from hyperbooth.world.personalization import personalize_subjects

log = logging.getLogger(__name__)

#: ``method.kind`` values besides the registered methods' names.
KINDS = ("base", "lora_folder", "personalizer")


def method_kinds() -> tuple[str, ...]:
    """Every ``method.kind`` accepted now: :data:`KINDS` and each registered method's name."""
    return (*KINDS, *sorted(METHODS))


class Method(ABC):
    """(subject photos, prompt) → images ``(len(seeds), 3, H, W)`` in [-1, 1], image ``i`` from ``seeds[i]``."""

    name: str = ""

    @abstractmethod
    def describe(self) -> str: ...

    def personalize(self, subject: Subject) -> float:
        """Prepare for ``subject`` (e.g. predict its LoRA); seconds it took. Called once before its prompts."""
        return 0.0

    def prompt_text(self, subject: Subject, prompt: EvalPrompt) -> str:
        """The text the model is given for ``prompt``."""
        return prompt.class_prompt(subject.class_name)

    @abstractmethod
    def generate(self, subject: Subject, prompt: EvalPrompt, seeds: Sequence[int]) -> torch.Tensor: ...


class BaseModelMethod(Method):
    """The floor: the frozen base model, class prompt, no personalization, CFG (HM-CFG needs a personalized model:
    asking it for the floor is an error, not a silent switch)."""

    name = "base"

    def __init__(self, backend: Backend, guidance: Guidance = Guidance()):
        if guidance.guidance != "cfg":
            raise ConfigError(f"the floor (method.kind=base) samples the base model with CFG; guidance {guidance.guidance!r} needs a personalized model")
        self.backend, self.guidance = backend, guidance

    def describe(self) -> str:
        return f"floor: the base model with the class prompt (no personalization), {self.guidance.describe()}"

    def generate(self, subject, prompt, seeds):
        text = self.prompt_text(subject, prompt)
        return self.backend.generate([text] * len(seeds), list(seeds), lora=None, guidance=self.guidance)


class LoRAMethod(Method):
    """A LoRA per subject, applied while the backend samples the rare-token prompt."""

    def __init__(self, backend: Backend, guidance: Guidance = Guidance(), token: str = RARE_TOKEN):
        self.backend, self.guidance, self.token = backend, guidance, token
        self._subject: str | None = None
        self._lora: dict[str, LoRAWeights] | None = None

    @abstractmethod
    def lora_for(self, subject: Subject) -> tuple[dict[str, LoRAWeights], float | None]:
        """(component → LoRAWeights of one subject, seconds by the method's own clock or None for the wall time)."""

    def personalize(self, subject: Subject) -> float:
        t0 = time.perf_counter()
        self._subject, self._lora = None, None
        lora, seconds = self.lora_for(subject)
        spent = time.perf_counter() - t0 if seconds is None else seconds
        models = self.backend.models()
        extra = set(lora) - set(models)
        if extra:
            raise ConfigError(f"the LoRA of {subject.name} targets {', '.join(sorted(extra))}, which the {self.backend.name} backend lacks (it has {', '.join(models)})")
        self._subject, self._lora = subject.name, lora
        return spent

    def prompt_text(self, subject, prompt):
        return prompt.personalized(self.token, subject.class_name)

    def generate(self, subject, prompt, seeds):
        if self._subject != subject.name:
            self.personalize(subject)
        text = self.prompt_text(subject, prompt)
        return self.backend.generate([text] * len(seeds), list(seeds), lora=self._lora, guidance=self.guidance)


class PersonalizerMethod(LoRAMethod):
    """Any :class:`~hyperbooth.methods.base.Personalizer`: ``personalize(references, backbone, class_names)`` gives
    the subject's LoRA (class names passed where the method ``needs_class_names``)."""

    def __init__(self, backend: Backend, personalizer: Personalizer, guidance: Guidance = Guidance(), token: str = RARE_TOKEN,
                 source: str | None = None):
        super().__init__(backend, guidance, token)
        personalizer.check_backbone(backend.backbone, source)
        self.personalizer = personalizer.to(backend.backbone.device).eval()
        self.name = personalizer.method
        self.source = source

    def describe(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"{self.name} personalizer{where} (through the Personalizer interface); {self.guidance.describe()}"

    @torch.no_grad()
    def lora_for(self, subject):
        """The world table's step (:func:`~hyperbooth.world.personalization.personalize_subjects`) for one subject:
        its time after an untimed warm-up call, or the method's own clock."""
        weights, ms = personalize_subjects(self.personalizer, subject.images[None], [subject.class_name], self.backend.backbone)
        return weights, ms / 1e3


class LoRAFolderMethod(LoRAMethod):
    """``<path>/<subject name>.safetensors`` per subject."""

    name = "lora_folder"

    def __init__(self, backend: Backend, path: str, guidance: Guidance = Guidance(), token: str = RARE_TOKEN):
        super().__init__(backend, guidance, token)
        if not path or not Path(path).is_dir():
            raise ConfigError(f"LoRA folder {str(path)!r} does not exist (method.path: a folder of <subject>.safetensors files)")
        self.path = Path(path)

    def describe(self) -> str:
        return f"a LoRA file per subject from {self.path} (<subject>.safetensors); {self.guidance.describe()}"

    def lora_for(self, subject):
        file = self.path / f"{subject.name}.safetensors"
        if not file.is_file():
            raise LoRAFileError(f"{file}: no LoRA file for subject {subject.name!r}")
        models = self.backend.models()
        loaded = load_lora(file, models)
        extra = set(loaded.components) - set(models)
        if extra:
            raise LoRAFileError(f"{file}: components {', '.join(sorted(extra))} are not in the model (it has {', '.join(models)})")
        return dict(loaded.components), None


def build_personalizer(kind: str, path: str | None, options: Mapping, backend: Backend) -> tuple[Personalizer, str]:
    """The personalizer ``method.kind`` / ``method.path`` / ``method.options`` name, and where it came from.

    ``personalizer``: the folder's method; a registered name: its folder (checked to hold that method) or, without a
    folder, a new instance from its config (``options``), for methods with nothing trained ahead."""
    if kind == "personalizer":
        if not path:
            raise ConfigError("method.kind=personalizer needs method.path (a personalizer folder of any registered method)")
        return load(path), str(path)
    cls = get(kind, what="method.kind")
    if path:
        if options:
            raise ConfigError(f"method.options configure a new {kind} personalizer; a folder (method.path={path}) brings its own config")
        personalizer = load(path)
        if personalizer.method != kind:
            raise CheckpointError(f"method.path={path} holds a {personalizer.method!r} personalizer, not {kind!r} (method.kind)")
        return personalizer, str(path)
    if cls.trainable:
        raise ConfigError(f"method {kind!r} is trained ahead: give its folder (method.path=...)")
    config = config_from_dict(cls.config_class, dict(options), source="method.options")
    return cls.for_backbone(config, backend.backbone), f"{kind} with {dict(options) or 'its default config'}"


def build_method(kind: str, backend: Backend, path: str | None = None, guidance: Guidance = Guidance(), token: str = RARE_TOKEN,
                 options: Mapping | None = None) -> Method:
    """The method ``method.kind`` names (see the module docstring)."""
    if kind == "base":
        return BaseModelMethod(backend, guidance)
    if kind == "lora_folder":
        return LoRAFolderMethod(backend, path, guidance, token)
    if kind not in method_kinds():
        raise ConfigError(f"method.kind={kind!r} is not one of {', '.join(method_kinds())}")
    personalizer, source = build_personalizer(kind, path, options or {}, backend)
    return PersonalizerMethod(backend, personalizer, guidance, token, source)
