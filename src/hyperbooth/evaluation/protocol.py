"""The DreamBench protocol (Ruiz et al. 2023): for every subject and every prompt of its kind (object or live),
``images_per_prompt`` images with fixed seeds from a method, each scored by every metric.

    cfg = load_config(EvalConfig, "configs/eval_world.yaml", ["images_per_prompt=2"])
    results = run_eval(cfg, json_path="eval.json", report_path="eval.html")

Image ``k`` of every (subject, prompt) uses seed ``seed + k``, for every method: methods are compared on the same
initial noise. Results are written to the JSON after every subject; a generation or metric that fails is recorded
under ``failed`` / ``failures`` and the run goes on (``status: "partial"``), so a long run keeps what it measured.
Bad input (a config value, a subject folder, a checkpoint) fails before anything is generated.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import hyperbooth
from hyperbooth.config import to_dict
from hyperbooth.devices import DTYPES, resolve_device
from hyperbooth.errors import ConfigError
from hyperbooth.evaluation.backends import Backend, DiffusersBackend, Guidance, WorldBackend
from hyperbooth.evaluation.methods import KINDS, Method, build_method, method_kinds
from hyperbooth.evaluation.metrics import METRICS, Metric, build_metrics, to_pil
from hyperbooth.evaluation.report import write_html, write_json
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS, GUIDANCE, check_interval
from hyperbooth.methods import get
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS
from hyperbooth.world.contexts import RARE_TOKEN

log = logging.getLogger(__name__)

BACKENDS = ("world", "diffusers")


@dataclass
class BackendConfig:
    kind: str = "world"  # "world" (the embedded DreamBench-World) or "diffusers" (a diffusers pipeline folder)
    model: str | None = None  # world: base-model folder (None: the shipped one); diffusers: the pipeline folder
    device: str = "cpu"  # "auto", "cpu", "cuda", ...
    dtype: str = "float32"  # float32 | float16 | bfloat16
    steps: int = DEFAULT_STEPS
    scheduler: str = DEFAULT_SCHEDULER  # a hyperbooth.sampling name (ddim, dpm++, euler, ...)
    resolution: int = 0  # diffusers: 0 = the pipeline's default (512 for SD 1.5)

    def validate(self) -> None:
        if self.kind not in BACKENDS:
            raise ConfigError(f"backend.kind={self.kind!r} is not one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"backend.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"backend.scheduler={self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ConfigError(f"backend.steps={self.steps} must be at least 1")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(f"backend.resolution={self.resolution} must be 0 or a positive multiple of 8")


@dataclass
class DataConfig:
    dataset: str = "../shared/dreambench/dataset"  # diffusers: DreamBench layout, one folder of photos per subject
    prompts_file: str | None = None  # default <dataset>/prompts_and_classes.txt; world: optional (the prompts it can show)
    subjects: tuple[str, ...] = ()  # diffusers: subject names to evaluate (empty: all in the class table)
    reference_size: int = 512  # diffusers: photos are centre-cropped and resized to this
    world_subjects: int = 8  # world: the first N held-out (test split) identities
    world_references: int = 3  # world: reference renders per identity
    max_prompts: int = 0  # the first N prompts of each kind (0: all)

    def validate(self) -> None:
        for key in ("reference_size", "world_subjects", "world_references"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be at least 1")
        if self.max_prompts < 0:
            raise ConfigError(f"data.max_prompts={self.max_prompts} must be 0 (all) or positive")


@dataclass
class MethodConfig:
    # base (the floor) | lora_folder (<subject>.safetensors each) | personalizer (a folder of any registered method)
    # | a registered method's name (e.g. dreambooth-lora: its folder, or built from method.options)
    kind: str = "base"
    path: str | None = None
    options: dict = field(default_factory=dict)  # a registered method built without a folder: its config's fields
    token: str = RARE_TOKEN  # the unique token of personalized prompts
    guidance: str = "cfg"  # cfg | hm-cfg (personalized methods; the floor samples with CFG)
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    w_base: float = DEFAULT_W_BASE
    w_pers: float = DEFAULT_W_PERS
    pers_interval: tuple[float, float] = DEFAULT_PERS_INTERVAL
    lora_scale: float = 1.0

    def validate(self) -> None:
        if self.kind not in method_kinds():
            raise ConfigError(f"method.kind={self.kind!r} is not one of {', '.join(method_kinds())}")
        if self.kind in ("personalizer", "lora_folder") and not self.path:
            what = "a personalizer folder of any registered method" if self.kind == "personalizer" else "a folder of <subject>.safetensors"
            raise ConfigError(f"method.kind={self.kind!r} needs method.path ({what})")
        if self.options and (self.kind in KINDS or self.path):
            raise ConfigError(f"method.options configure a registered method built without a folder; method.kind={self.kind!r}"
                              + (f" with method.path={self.path}" if self.path else "") + " takes none")
        if self.kind not in KINDS and get(self.kind).trainable and not self.path:
            raise ConfigError(f"method.kind={self.kind!r} is trained ahead: give its folder (method.path=...)")
        if self.guidance not in GUIDANCE:
            raise ConfigError(f"method.guidance={self.guidance!r} is not one of {', '.join(GUIDANCE)}")
        if self.kind == "base" and self.guidance != "cfg":
            raise ConfigError(f"method.guidance={self.guidance!r} needs a personalized model; the floor (method.kind=base) samples with cfg")
        check_interval(self.pers_interval, "method.pers_interval")
        if not self.token.strip():
            raise ConfigError("method.token must not be empty")


@dataclass
class MetricsConfig:
    use: tuple[str, ...] = ("oracle_retrieval", "oracle_auc", "oracle_subject", "oracle_prompt")
    dino: str | None = None  # a transformers vision checkpoint folder (DINO ViT-S/16: facebook/dino-vits16)
    clip: str | None = None  # a transformers CLIPModel folder with its tokenizer and image processor
    oracles: str | None = None  # the world's oracle folder (None: the shipped one)
    face_upsample: int = 1  # dlib HOG detector upsampling (finds smaller faces, slower)
    device: str = "cpu"
    batch_size: int = 16

    def validate(self) -> None:
        if not self.use:
            raise ConfigError("metrics.use is empty; name at least one of " + ", ".join(METRICS))
        for name in self.use:
            if name not in METRICS:
                raise ConfigError(f"metrics.use has unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if len(set(self.use)) != len(self.use):
            raise ConfigError(f"metrics.use names a metric twice: {list(self.use)}")
        if self.face_upsample < 0 or self.batch_size < 1:
            raise ConfigError("metrics.face_upsample must be ≥ 0 and metrics.batch_size ≥ 1")


@dataclass
class ReportConfig:
    embed_images: bool = True  # HTML: images inline as base64 PNG (one file); false: PNGs in <report>_images/ beside it
    thumbnail: int = 256  # longest side of the images in the report (smaller ones are shown enlarged)

    def validate(self) -> None:
        if self.thumbnail < 8:
            raise ConfigError(f"report.thumbnail={self.thumbnail} must be at least 8")


@dataclass
class EvalConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    images_per_prompt: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.images_per_prompt < 1:
            raise ConfigError(f"images_per_prompt={self.images_per_prompt} must be at least 1")
        if self.backend.kind == "diffusers":
            oracle = [m for m in self.metrics.use if m.startswith("oracle_")]
            if oracle:
                raise ConfigError(f"metrics.use has {', '.join(oracle)}: the world's oracles judge DreamBench-World images only (backend.kind=world)")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.images_per_prompt)]


# -- building the parts -----------------------------------------------------------------------------------------


def build_backend(cfg: EvalConfig) -> Backend:
    b, d = cfg.backend, cfg.data
    if b.kind == "world":
        return WorldBackend(b.model, b.device, b.steps, b.scheduler, d.world_subjects, d.world_references, d.prompts_file, cfg.seed, b.dtype)
    return DiffusersBackend(b.model, d.dataset, d.prompts_file, d.subjects, d.reference_size, b.device, b.dtype, b.steps, b.scheduler, b.resolution)


def guidance_of(cfg: MethodConfig) -> Guidance:
    return Guidance(cfg.guidance, cfg.guidance_scale, cfg.w_base, cfg.w_pers, tuple(cfg.pers_interval), cfg.lora_scale)


def _metrics(cfg: EvalConfig) -> list[Metric]:
    m = cfg.metrics
    return build_metrics(m.use, dino=m.dino, clip=m.clip, oracles=m.oracles, face_upsample=m.face_upsample, device=str(resolve_device(m.device)), batch_size=m.batch_size)


# -- the run ----------------------------------------------------------------------------------------------------


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarize(values: list[float | None]) -> dict:
    """Mean over the images that have a score; how many do not."""
    ok = _finite(values)
    mean = sum(ok) / len(ok) if ok else None
    std = math.sqrt(sum((v - mean) ** 2 for v in ok) / len(ok)) if ok else None
    return {"mean": mean, "std": std, "n": len(ok), "undefined": len(values) - len(ok)}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Gallery:
    """Report thumbnails (PNG bytes) per subject: its references and the images of each prompt."""

    def __init__(self, size: int):
        self.size = size
        self.subjects: dict[str, dict] = {}

    def png(self, image: torch.Tensor) -> bytes:
        pil = to_pil(image[None])[0]
        if max(pil.size) > self.size:
            pil.thumbnail((self.size, self.size), Image.LANCZOS)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return buf.getvalue()

    def add_references(self, subject: str, images: torch.Tensor) -> None:
        self.subjects.setdefault(subject, {"references": [], "prompts": {}})["references"] = [self.png(x) for x in images]

    def add(self, subject: str, prompt: str, images: torch.Tensor) -> None:
        self.subjects.setdefault(subject, {"references": [], "prompts": {}})["prompts"][prompt] = [self.png(x) for x in images]


def run_eval(cfg: EvalConfig, json_path: str | Path, report_path: str | Path | None = None,
             backend: Backend | None = None, method: Method | None = None, metrics: list[Metric] | None = None) -> dict:
    """Run the protocol; write the JSON (after every subject) and, with ``report_path``, the HTML report.

    ``backend`` / ``method`` / ``metrics`` replace the ones the config names (to evaluate a method of your own).
    """
    json_path = Path(json_path)
    for p in (json_path, report_path):
        if p is not None and not Path(p).parent.is_dir():
            raise ConfigError(f"output folder {str(Path(p).parent)!r} does not exist")
    t_start = time.perf_counter()
    metrics = metrics if metrics is not None else _metrics(cfg)  # a missing checkpoint fails here, before sampling
    backend = backend or build_backend(cfg)
    subjects = backend.subjects()  # bad subject folders fail here
    method = method or build_method(cfg.method.kind, backend, cfg.method.path, guidance_of(cfg.method), cfg.method.token, cfg.method.options)
    seeds = cfg.seeds
    results: dict = {
        "hyperbooth_version": hyperbooth.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "running",
        "config": to_dict(cfg),
        "backend": {"kind": backend.name, "description": backend.describe()},
        "method": {"kind": method.name, "description": method.describe()},
        "metrics": {m.name: {"description": m.describe(), "compares_with": m.target, "null_means": m.undefined} for m in metrics},
        "protocol": {"images_per_prompt": cfg.images_per_prompt, "seeds": seeds,
                     "note": "image k of every (subject, prompt) uses seed seeds[k]; scores are per image, null where a metric is undefined"},
        "subjects": {},
        "summary": {},
        "failures": [],
    }
    gallery = Gallery(cfg.report.thumbnail) if report_path is not None else None
    per_metric_all: dict[str, list] = {m.name: [] for m in metrics}

    for si, subject in enumerate(subjects):
        log.info("subject %d/%d: %s (%s, %s)", si + 1, len(subjects), subject.name, subject.class_name, subject.kind)
        entry: dict = {
            "class": subject.class_name, "kind": subject.kind, "reference_count": int(subject.images.shape[0]), "references": list(subject.files),
            "skipped_files": list(subject.skipped), "identity_seed": subject.identity_seed,
            "personalize_seconds": None, "failed": None, "prompts": {}, "summary": {},
        }
        results["subjects"][subject.name] = entry
        if gallery is not None:
            gallery.add_references(subject.name, subject.images)
        prompts = backend.prompts(subject.kind)
        if cfg.data.max_prompts:
            prompts = prompts[: cfg.data.max_prompts]
        try:
            entry["personalize_seconds"] = method.personalize(subject)
        except Exception as e:  # recorded, the run goes on with the next subject
            entry["failed"] = {"personalize": _error(e)}
            results["failures"].append({"subject": subject.name, "prompt": None, "stage": "personalize", "error": _error(e)})
            log.error("%s: personalization failed: %s", subject.name, _error(e))
            write_json(results, json_path)
            continue
        subject_scores: dict[str, list] = {m.name: [] for m in metrics}
        for prompt in prompts:
            text = method.prompt_text(subject, prompt)
            clean = prompt.class_prompt(subject.class_name)
            record: dict = {"template": prompt.template, "metric_prompt": clean, "seconds": None, "scores": {}, "summary": {}, "failed": {}}
            entry["prompts"][text] = record
            t0 = time.perf_counter()
            try:
                images = method.generate(subject, prompt, seeds)
                if images.shape[0] != len(seeds):
                    raise RuntimeError(f"method {method.name!r} returned {images.shape[0]} images for {len(seeds)} seeds")
            except Exception as e:
                record["failed"]["generate"] = _error(e)
                results["failures"].append({"subject": subject.name, "prompt": text, "stage": "generate", "error": _error(e)})
                log.error("%s / %r: generation failed: %s", subject.name, text, _error(e))
                continue
            record["seconds"] = time.perf_counter() - t0
            if gallery is not None:
                gallery.add(subject.name, text, images)
            for metric in metrics:
                try:
                    target = subject if metric.target == "references" else [clean] * images.shape[0]
                    scores = [float(v) for v in metric(images, target)]
                except Exception as e:
                    record["failed"][metric.name] = _error(e)
                    results["failures"].append({"subject": subject.name, "prompt": text, "stage": metric.name, "error": _error(e)})
                    log.error("%s / %r: metric %s failed: %s", subject.name, text, metric.name, _error(e))
                    continue
                clean_scores = [v if math.isfinite(v) else None for v in scores]
                record["scores"][metric.name] = clean_scores
                record["summary"][metric.name] = summarize(clean_scores)
                subject_scores[metric.name].extend(clean_scores)
                per_metric_all[metric.name].extend(clean_scores)
        entry["summary"] = {name: summarize(v) for name, v in subject_scores.items()}
        write_json(results, json_path)

    results["summary"] = {name: summarize(v) for name, v in per_metric_all.items()}
    results["status"] = "partial" if results["failures"] else "complete"
    results["seconds"] = time.perf_counter() - t_start
    write_json(results, json_path)
    if report_path is not None:
        write_html(results, gallery, Path(report_path), embed=cfg.report.embed_images)
    return results
