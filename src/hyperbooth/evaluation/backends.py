"""Where evaluation images come from: a text-to-image model, its subjects and its prompts.

- :class:`WorldBackend`: the embedded DreamBench-World. The world's base model; subjects are held-out (test split)
  identities with reference photos from :func:`hyperbooth.world.evaluate.reference_images`; prompts are DreamBench's
  prompts that the world can show (its backgrounds, recolours and accessory; the same phrases).
- :class:`DiffusersBackend`: a ``StableDiffusionPipeline`` folder (real SD 1.5 on a GPU) with DreamBench's subject
  folders and prompts file.

``backend.generate(prompts, seeds, lora)`` → ``(n, 3, H, W)`` in [-1, 1]: image ``i`` from ``prompts[i]`` with the
initial noise of ``seeds[i]`` (a CPU generator, so a seed gives the same noise on every device), with the LoRA
(component → :class:`~hyperbooth.lora.LoRAWeights` of one subject) applied inside a context that restores the model.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperbooth.devices import DTYPES, resolve_device

from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.evaluation.dreambench import EvalPrompt, PromptSet, Subject, load_subjects, parse_prompts_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guidance:
    """How to sample: CFG (``guidance_scale``), or HM-CFG (``w_base``, ``w_pers``; world only), LoRA scale."""

    guidance: str = "cfg"
    guidance_scale: float = 3.0
    w_base: float = 3.0
    w_pers: float = 1.0
    lora_scale: float = 1.0


class Backend(ABC):
    """A model to sample, the subjects to personalize it to, and the prompts of each subject kind."""

    name: str = ""
    components: tuple[str, ...] = ("unet",)  # the models a LoRA may target

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def subjects(self) -> list[Subject]: ...

    @abstractmethod
    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]: ...

    @abstractmethod
    def models(self) -> dict[str, torch.nn.Module]:
        """Component name → module, what LoRA files are checked against."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], lora: Mapping | None = None, guidance: Guidance = Guidance()) -> torch.Tensor: ...


# -- DreamBench-World -------------------------------------------------------------------------------------------


def world_context(prompt: EvalPrompt):
    """The world :class:`~hyperbooth.world.contexts.Context` a DreamBench prompt asks for, or None where the world
    cannot show it ("a shiny ...", "... in a chef outfit")."""
    from hyperbooth.world import contexts as ctx

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
    from hyperbooth.world import contexts as ctx

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
    name = "world"

    def __init__(self, model: str | None = None, device: str = "cpu", steps: int = 25, scheduler: str = "dpm++",
                 num_subjects: int = 8, references: int = 3, prompts_file: str | None = None, seed: int = 0):
        from hyperbooth.backbones.world import WorldBackbone

        if model not in (None, "") and not Path(model).is_dir():
            raise CheckpointError(f"world base model folder {str(model)!r} does not exist")
        self.model = WorldBackbone.from_pretrained(model or None, device=resolve_device(device))
        self.steps, self.scheduler, self.seed = steps, scheduler, seed
        self.num_subjects, self.references = num_subjects, references
        self._prompts = world_prompts(parse_prompts_file(prompts_file) if prompts_file else None)

    def describe(self) -> str:
        return (f"DreamBench-World: base model {self.model.path} ({self.model.resolution}x{self.model.resolution}), "
                f"{self.num_subjects} held-out identities x {self.references} reference renders, {self.scheduler} {self.steps} steps")

    def subjects(self) -> list[Subject]:
        from hyperbooth.world.evaluate import reference_images
        from hyperbooth.world.identity import identity_class
        from hyperbooth.world.splits import identity_seeds

        out = []
        for s in identity_seeds("test", self.num_subjects):
            images = reference_images(s, self.references, seed=self.seed, resolution=self.model.resolution)
            out.append(Subject(name=f"world-{s}", class_name=identity_class(s), kind="object", images=images, identity_seed=s))
        return out

    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]:
        return self._prompts  # every world class is an object; the world's accessory is included for them

    def models(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.model.unet}

    def generate(self, prompts, seeds, lora=None, guidance: Guidance = Guidance()) -> torch.Tensor:
        from hyperbooth.generate import generate

        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        lora = dict(lora or {})
        extra = set(lora) - {"unet"}
        if extra:
            raise ConfigError(f"the world's base model takes UNet LoRAs only; the LoRA also has {', '.join(sorted(extra))}")
        weights = lora.get("unet")
        if weights is None and guidance.guidance == "hm-cfg":
            guidance = Guidance("cfg", guidance.guidance_scale)  # no personalized branch: HM-CFG is base CFG
        images = []
        for prompt, seed in zip(prompts, seeds):  # one call per image: its seed alone fixes its noise
            images.append(generate(self.model, [prompt], weights=weights, guidance=guidance.guidance, guidance_scale=guidance.guidance_scale,
                                   w_base=guidance.w_base, w_pers=guidance.w_pers, steps=self.steps, seed=int(seed),
                                   scheduler=self.scheduler, lora_scale=guidance.lora_scale))
        return torch.cat(images).float().cpu()


# -- diffusers StableDiffusionPipeline --------------------------------------------------------------------------



class DiffusersBackend(Backend):
    name = "diffusers"
    components = ("unet", "text_encoder")

    def __init__(self, model: str, dataset: str, prompts_file: str | None = None, subjects: Sequence[str] = (), reference_size: int = 512,
                 device: str = "auto", dtype: str = "float32", steps: int = 50, scheduler: str = "ddim", resolution: int = 0, batch_size: int = 4):
        from diffusers import StableDiffusionPipeline

        from hyperbooth.sampling import make_scheduler

        if not model:
            raise ConfigError("backend.model must name a StableDiffusionPipeline folder for the diffusers backend")
        folder = Path(model)
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(f"diffusers pipeline folder {str(folder)!r} does not exist or lacks model_index.json")
        if dtype not in DTYPES:
            raise ConfigError(f"backend.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        self.device = resolve_device(device)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"diffusers pipeline folder {folder} cannot be loaded ({type(e).__name__}: {e})") from None
        if scheduler:
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.folder, self.steps, self.scheduler, self.batch_size = folder, steps, scheduler or type(pipe.scheduler).__name__, batch_size
        self.resolution = resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.prompt_set = parse_prompts_file(prompts_file or Path(dataset) / "prompts_and_classes.txt")
        self.dataset, self.subject_names, self.reference_size = dataset, tuple(subjects), reference_size

    def describe(self) -> str:
        return (f"diffusers StableDiffusionPipeline {self.folder} ({self.resolution}x{self.resolution}, {self.scheduler} {self.steps} steps) "
                f"on DreamBench subjects from {self.dataset}, prompts from {self.prompt_set.path}")

    def subjects(self) -> list[Subject]:
        return load_subjects(self.dataset, self.prompt_set, self.subject_names, size=self.reference_size)

    def prompts(self, kind: str) -> tuple[EvalPrompt, ...]:
        return self.prompt_set.prompts(kind)

    def models(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder}

    @torch.no_grad()
    def generate(self, prompts, seeds, lora=None, guidance: Guidance = Guidance()) -> torch.Tensor:
        from hyperbooth.lora import apply_lora

        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if guidance.guidance != "cfg":
            raise ConfigError(f"guidance {guidance.guidance!r} is not available with the diffusers backend; use method.guidance=cfg")
        models = self.models()
        lora = dict(lora or {})
        for comp in lora:
            if comp not in models:
                raise ConfigError(f"the pipeline has no component {comp!r} for the LoRA (it has {', '.join(models)})")
        out = []
        with contextlib.ExitStack() as stack:
            for comp, weights in lora.items():
                stack.enter_context(apply_lora(models[comp], weights, mode="merged", scale=guidance.lora_scale))
            for i in range(0, len(prompts), self.batch_size):
                chunk, chunk_seeds = list(prompts[i : i + self.batch_size]), seeds[i : i + self.batch_size]
                generators = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk_seeds]
                images = self.pipe(prompt=chunk, num_inference_steps=self.steps, guidance_scale=guidance.guidance_scale, generator=generators,
                                   height=self.resolution, width=self.resolution, output_type="pt").images
                out.append(images.float().cpu() * 2 - 1)  # [0, 1] → [-1, 1]
        return torch.cat(out).clamp(-1, 1)
