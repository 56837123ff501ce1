"""Where evaluation images come from: a :class:`~hyperbooth.backbones.base.Backbone`, its subjects and its prompts.

- :class:`WorldBackend`: the embedded DreamBench-World. Subjects are held-out (test split) identities with
  reference photos from :func:`hyperbooth.world.fidelity.reference_images`; prompts are DreamBench's prompts that the
  world can show (its backgrounds, recolours and accessory; the same phrases).
- :class:`DiffusersBackend`: a diffusers pipeline folder (an SD 1.5-architecture ``StableDiffusionPipeline``; real
  SD 1.5 on a GPU) with DreamBench's subject folders and prompts file.

Both sample the same way, through :func:`hyperbooth.generate.generate` over their backbone (a
:class:`~hyperbooth.backbones.WorldBackbone`; what :func:`hyperbooth.backbones.load_backbone` reads from the
pipeline folder), so CFG and HM-CFG work on either: ``backend.generate(prompts, seeds,
lora, guidance)`` → ``(n, 3, H, W)`` in [-1, 1], image ``i`` from ``prompts[i]`` with the initial noise of
``seeds[i]`` (one ``generate`` call per image, its noise drawn on the CPU: a seed gives the same noise on every
device and in every batch), with the LoRA (component → :class:`~hyperbooth.lora.LoRAWeights` of one subject).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperbooth.backbones import Backbone, WorldBackbone, load_backbone
from hyperbooth.devices import resolve_device, resolve_dtype
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.evaluation.dreambench import EvalPrompt, PromptSet, Subject, load_subjects, parse_prompts_file
from hyperbooth.generate import generate
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.lora.weights import LoRAWeights
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS
from hyperbooth.world import contexts as ctx
from hyperbooth.world.fidelity import reference_images
from hyperbooth.world.identity import identity_class
from hyperbooth.world.splits import identity_seeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guidance:
    """How to sample: ``"cfg"`` (``guidance_scale``) or ``"hm-cfg"`` (``w_base``, ``w_pers``, ``pers_interval``;
    it needs a LoRA), and the LoRA's scale. Defaults: :mod:`hyperbooth.guidance`."""

    guidance: str = "cfg"
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    w_base: float = DEFAULT_W_BASE
    w_pers: float = DEFAULT_W_PERS
    pers_interval: tuple[float, float] = DEFAULT_PERS_INTERVAL
    lora_scale: float = 1.0

    def describe(self) -> str:
        if self.guidance == "hm-cfg":
            return f"HM-CFG w_base={self.w_base:g} w_pers={self.w_pers:g}"
        return f"CFG {self.guidance_scale:g}"


class Backend(ABC):
    """A backbone to sample, the subjects to personalize it to, and the prompts of each subject kind."""

    name: str = ""
    backbone: Backbone
    steps: int = DEFAULT_STEPS
    scheduler: str = DEFAULT_SCHEDULER

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def subjects(self) -> list[Subject]: ...

    @abstractmethod
    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]: ...

    def models(self) -> dict[str, torch.nn.Module]:
        """Component name → module: what LoRAs may target and LoRA files are checked against."""
        return dict(self.backbone.components)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], lora: Mapping[str, LoRAWeights] | None = None,
                 guidance: Guidance = Guidance()) -> torch.Tensor:
        """Image ``i`` of ``prompts[i]`` from the noise of ``seeds[i]``; ``(n, 3, H, W)`` float32 on the CPU in [-1, 1].
        ``lora``: component → one subject's LoRA, or None for the base model (then ``guidance`` must be CFG: HM-CFG
        without a personalized model is refused, never replaced)."""
        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        weights = dict(lora) if lora else None
        images = []
        for prompt, seed in zip(prompts, seeds):  # one call per image: its seed alone fixes its noise
            images.append(generate(
                self.backbone, [prompt], weights, guidance=guidance.guidance, guidance_scale=guidance.guidance_scale,
                w_base=guidance.w_base, w_pers=guidance.w_pers, pers_interval=guidance.pers_interval, steps=self.steps,
                seed=int(seed), scheduler=self.scheduler, lora_scale=guidance.lora_scale,
            ))
        return torch.cat(images).float().cpu()


# -- DreamBench-World -------------------------------------------------------------------------------------------


def world_context(prompt: EvalPrompt) -> ctx.Context | None:
    """The world :class:`~hyperbooth.world.contexts.Context` a DreamBench prompt asks for, or None where the world
    cannot show it ("a shiny ...", "... in a chef outfit")."""
    before, _, after = prompt.template.partition("{0} {1}")
    before, after = " ".join(before.split()), " ".join(after.split())
    words = before.split()
    if not words or words[0] != "a":
        return None
    recolor_word = " ".join(words[1:])
    fields: dict[str, str] = {}
    if recolor_word:
        names = [k for k, v in ctx.RECOLOR_WORDS.items() if v == recolor_word]
        if not names:
            return None
        fields["recolor"] = names[0]
    if after:
        backgrounds = [k for k, v in ctx.BACKGROUNDS.items() if v == after]
        accessories = [k for k, v in ctx.ACCESSORY_PHRASES.items() if v == after]
        if backgrounds:
            fields["background"] = backgrounds[0]
        elif accessories:
            fields["accessory"] = accessories[0]
        else:
            return None
    return ctx.Context(**fields) if fields else None


def world_prompts(prompt_set: PromptSet | None = None) -> tuple[EvalPrompt, ...]:
    """DreamBench prompts the world can show: from ``prompt_set`` (object list, then the live list's extra ones), or
    built from the world's vocabulary (its phrases are DreamBench's)."""
    if prompt_set is None:
        templates = [f"a {{0}} {{1}} {phrase}" for phrase in ctx.BACKGROUNDS.values()]
        templates += [f"a {word} {{0}} {{1}}" for word in ctx.RECOLOR_WORDS.values()]
        templates += [f"a {{0}} {{1}} {phrase}" for phrase in ctx.ACCESSORY_PHRASES.values()]
    else:
        templates, skipped = [], []
        for p in (*prompt_set.object_prompts, *prompt_set.live_prompts):
            if p.template in templates:
                continue
            (templates if world_context(p) is not None else skipped).append(p.template)
        if skipped:
            log.info("DreamBench-World cannot show %d prompts of %s; left out: %s", len(skipped), prompt_set.path, "; ".join(skipped))
        if not templates:
            raise ConfigError(f"none of the prompts in {prompt_set.path} is one the world can show")
    return tuple(EvalPrompt(t, index=i) for i, t in enumerate(templates))


class WorldBackend(Backend):
    """The world's base model (``model``: its folder; None: the shipped one) with held-out identities as subjects."""

    name = "world"

    def __init__(self, model: str | None = None, device: str = "cpu", steps: int = DEFAULT_STEPS, scheduler: str = DEFAULT_SCHEDULER,
                 num_subjects: int = 8, references: int = 3, prompts_file: str | None = None, seed: int = 0, dtype: str = "float32"):
        if model not in (None, "") and not Path(model).is_dir():
            raise CheckpointError(f"world base model folder {str(model)!r} does not exist")
        self.backbone = WorldBackbone.from_pretrained(model or None, device=resolve_device(device), dtype=resolve_dtype(dtype, "backend.dtype"))
        self.steps, self.scheduler, self.seed = steps, scheduler, seed
        self.num_subjects, self.references = num_subjects, references
        self._prompts = world_prompts(parse_prompts_file(prompts_file) if prompts_file else None)

    def describe(self) -> str:
        b = self.backbone
        return (f"DreamBench-World: base model {b.path} ({b.resolution}x{b.resolution}), "
                f"{self.num_subjects} held-out identities x {self.references} reference renders, {self.scheduler} {self.steps} steps")

    def subjects(self) -> list[Subject]:
        out = []
        for s in identity_seeds("test", self.num_subjects):
            images = reference_images(s, self.references, seed=self.seed, resolution=self.backbone.resolution)
            out.append(Subject(name=f"world-{s}", class_name=identity_class(s), kind="object", images=images, identity_seed=s))
        return out

    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]:
        return self._prompts  # every world class is an object; the world's accessory is included for them


# -- a diffusers pipeline on DreamBench's subject folders -------------------------------------------------------


class DiffusersBackend(Backend):
    """A diffusers pipeline folder (:func:`~hyperbooth.backbones.load_backbone` picks its backbone class) with
    DreamBench's subject folders and prompts file. ``resolution``: the side of the generated images (0: the
    pipeline's own, 512 for SD 1.5)."""

    name = "diffusers"

    def __init__(self, model: str, dataset: str, prompts_file: str | None = None, subjects: Sequence[str] = (), reference_size: int = 512,
                 device: str = "auto", dtype: str = "float32", steps: int = DEFAULT_STEPS, scheduler: str = DEFAULT_SCHEDULER, resolution: int = 0):
        if not model:
            raise ConfigError("backend.model must name a diffusers pipeline folder for the diffusers backend")
        folder = Path(model)
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(f"diffusers pipeline folder {str(folder)!r} does not exist or lacks model_index.json")
        self.backbone = load_backbone(folder, device=resolve_device(device), dtype=resolve_dtype(dtype, "backend.dtype"))
        if resolution:
            factor = self.backbone.spatial_factor
            if resolution % factor:
                raise ConfigError(f"backend.resolution={resolution} must be a multiple of {factor} (the {self.backbone.name} backbone's latent cell)")
            self.backbone.resolution = resolution  # generate samples (resolution / factor)² latents
        self.folder, self.steps, self.scheduler = folder, steps, scheduler
        self.prompt_set = parse_prompts_file(prompts_file or Path(dataset) / "prompts_and_classes.txt")
        self.dataset, self.subject_names, self.reference_size = dataset, tuple(subjects), reference_size

    def describe(self) -> str:
        b = self.backbone
        return (f"diffusers pipeline {self.folder} ({b.name} backbone, {b.resolution}x{b.resolution}, {self.scheduler} {self.steps} steps) "
                f"on DreamBench subjects from {self.dataset}, prompts from {self.prompt_set.path}")

    def subjects(self) -> list[Subject]:
        return load_subjects(self.dataset, self.prompt_set, self.subject_names, size=self.reference_size)

    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]:
        return self.prompt_set.prompts(kind)
