"""Personalization methods under evaluation: ``method.generate(subject, prompt, seeds)`` → images.

A :class:`Method` maps (a subject's reference photos, a DreamBench prompt) to images; write a subclass to evaluate
any other method. The ones here sample a :class:`~hyperbooth.evaluation.backends.Backend`:

- :class:`BaseModelMethod` (``base``): the floor, no personalization: the base model with the class prompt
  (``"a backpack in the jungle"``).
- :class:`HypernetMethod` (``hypernet``): an e2e hypernetwork folder predicts a LoRA from the photos in one pass;
  the model samples the rare-token prompt (``"a sks backpack in the jungle"``) with it.
- :class:`LoRAFolderMethod` (``lora_folder``): ``<folder>/<subject name>.safetensors`` per subject (e.g. DreamBooth-
  LoRA fine-tuned per subject: the ceiling baseline), diffusers or kohya layout.

LoRA methods compute a subject's LoRA once (``personalize``) and time it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.evaluation.backends import Backend, Guidance
from hyperbooth.evaluation.dreambench import EvalPrompt, Subject

log = logging.getLogger(__name__)

METHODS = ("base", "hypernet", "lora_folder")


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
    """The floor: the frozen base model, class prompt, no personalization."""

    name = "base"

    def __init__(self, backend: Backend, guidance: Guidance = Guidance()):
        self.backend, self.guidance = backend, guidance

    def describe(self) -> str:
        return f"floor: the base model with the class prompt (no personalization), CFG {self.guidance.guidance_scale}"

    def generate(self, subject, prompt, seeds):
        text = self.prompt_text(subject, prompt)
        return self.backend.generate([text] * len(seeds), list(seeds), lora=None, guidance=self.guidance)


class LoRAMethod(Method):
    """A LoRA per subject, applied while the backend samples the rare-token prompt."""

    def __init__(self, backend: Backend, guidance: Guidance = Guidance(), token: str = "sks"):
        self.backend, self.guidance, self.token = backend, guidance, token
        self._subject: str | None = None
        self._lora: dict | None = None

    @abstractmethod
    def lora_for(self, subject: Subject) -> dict:
        """Component → LoRAWeights (one subject)."""

    def personalize(self, subject: Subject) -> float:
        t0 = time.perf_counter()
        self._subject, self._lora = None, None
        lora = self.lora_for(subject)
        self._subject, self._lora = subject.name, lora
        return time.perf_counter() - t0

    def prompt_text(self, subject, prompt):
        return prompt.personalized(self.token, subject.class_name)

    def generate(self, subject, prompt, seeds):
        if self._subject != subject.name:
            self.personalize(subject)
        text = self.prompt_text(subject, prompt)
        return self.backend.generate([text] * len(seeds), list(seeds), lora=self._lora, guidance=self.guidance)

    def _guidance_text(self) -> str:
        g = self.guidance
        if g.guidance == "hm-cfg":
            return f"HM-CFG w_base={g.w_base} w_pers={g.w_pers}"
        return f"CFG {g.guidance_scale}"


class HypernetMethod(LoRAMethod):
    name = "hypernet"

    def __init__(self, backend: Backend, path: str, guidance: Guidance = Guidance(), token: str = "sks"):
        from hyperbooth.methods.e2e import E2EHyperNetwork

        super().__init__(backend, guidance, token)
        if not path or not Path(path).is_dir():
            raise CheckpointError(f"hypernetwork folder {str(path)!r} does not exist (method.path)")
        self.path = Path(path)
        self.hypernet = E2EHyperNetwork.from_pretrained(self.path).to(next(backend.models()["unet"].parameters()).device)

    def describe(self) -> str:
        return f"e2e hypernetwork {self.path}: one forward pass from the reference photos to a LoRA; {self._guidance_text()}"

    @torch.no_grad()
    def lora_for(self, subject):
        device = next(self.hypernet.parameters()).device
        weights = self.hypernet(subject.images[None].to(device))  # (1, k, 3, H, W) → one subject
        return {"unet": weights}


class LoRAFolderMethod(LoRAMethod):
    name = "lora_folder"

    def __init__(self, backend: Backend, path: str, guidance: Guidance = Guidance(), token: str = "sks"):
        super().__init__(backend, guidance, token)
        if not path or not Path(path).is_dir():
            raise ConfigError(f"LoRA folder {str(path)!r} does not exist (method.path: a folder of <subject>.safetensors files)")
        self.path = Path(path)

    def describe(self) -> str:
        return f"a LoRA file per subject from {self.path} (<subject>.safetensors); {self._guidance_text()}"

    def lora_for(self, subject):
        from hyperbooth.errors import LoRAFileError
        from hyperbooth.lora import load_lora

        file = self.path / f"{subject.name}.safetensors"
        if not file.is_file():
            raise LoRAFileError(f"{file}: no LoRA file for subject {subject.name!r}")
        models = self.backend.models()
        loaded = load_lora(file, models)
        extra = set(loaded.components) - set(models)
        if extra:
            raise LoRAFileError(f"{file}: components {', '.join(sorted(extra))} are not in the model (it has {', '.join(models)})")
        return dict(loaded.components)


def build_method(kind: str, backend: Backend, path: str | None = None, guidance: Guidance = Guidance(), token: str = "sks") -> Method:
    if kind == "base":
        return BaseModelMethod(backend, guidance)
    if kind == "hypernet":
        return HypernetMethod(backend, path, guidance, token)
    if kind == "lora_folder":
        return LoRAFolderMethod(backend, path, guidance, token)
    raise ConfigError(f"unknown method {kind!r}; choose one of {', '.join(METHODS)}")
