"""The web page (``hyperbooth ui``): reference photos (or held-out world identities) → a LoRA from any registered
method → images under CFG or HM-CFG, the LoRA file to download, and an interpolation between two subjects.

Two layers, so that the page holds no logic of its own:

- :class:`Studio` does the work through the library's functions (``personalize``, ``generate``, ``save_lora``, the
  world's fidelity metrics), checks every input against :class:`Limits` and turns every failure into a
  :class:`UIError` whose message names the problem (a file, a value) — what the page shows instead of a traceback.
- :func:`build_app` lays the page out with gradio and wires its events to a Studio; gradio's queue runs one
  generation at a time and shows each waiting visitor its position.

    hyperbooth ui [--host 127.0.0.1] [--port 7860] [--model FOLDER] [--hypernet FOLDER ...]
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hyperbooth.backbones import Backbone, as_components
from hyperbooth.errors import HyperboothError
from hyperbooth.generate import generate
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_W_BASE, DEFAULT_W_PERS
from hyperbooth.images import MAX_PIXELS, load_image
from hyperbooth.lora.io import FORMATS, save_lora
from hyperbooth.lora.weights import LoRAWeights, combine
from hyperbooth.methods import Personalizer
from hyperbooth.personalize import lora_provenance


log = logging.getLogger(__name__)


def launch_options(studio: Studio) -> dict:
    """What ``app.launch`` needs besides host and port: the out folder servable, uploads capped at the page's limit."""
    return {"allowed_paths": [str(studio.out_dir)], "max_file_size": f"{studio.limits.max_file_mb:g}mb", "show_error": False}


def serve_locally(app, studio: Studio) -> str:
    """Launch ``app`` on a free loopback port without blocking (tests, benchmarks); returns its URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(studio))
    return f"http://127.0.0.1:{port}/"


class UIError(HyperboothError):
    """A problem with what a visitor asked for, said on the page in one sentence."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the page states them."""

    max_images: int = 5
    max_file_mb: float = 10.0
    max_pixels: int = MAX_PIXELS
    max_prompts: int = 4
    max_prompt_chars: int = 300
    max_outputs: int = 4  # images per prompt
    min_steps: int = 1
    max_steps: int = 50

    def describe(self) -> str:
        return (f"Limits: 1–{self.max_images} reference images of at most {self.max_file_mb:g} MB and {self.max_pixels / 1e6:g} M pixels each; "
                f"1–{self.max_prompts} prompts of at most {self.max_prompt_chars} characters; {self.min_steps}–{self.max_steps} steps; "
                f"at most {self.max_outputs} images per prompt. One generation runs at a time; others wait in the queue.")


def _images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


class Studio:
    """The page's work, on one backbone and a set of personalizers (label → personalizer, folder)."""

    def __init__(self, backbone: Backbone, personalizers: dict[str, tuple[Personalizer, Path | None]], limits: Limits = Limits(),
                 out_dir: str | os.PathLike | None = None, oracles=None):
        if not personalizers:
            raise UIError("no personalizer to serve: give at least one hypernetwork folder")
        self.backbone, self.personalizers, self.limits = backbone, personalizers, limits
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="hyperbooth-ui-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._oracles = oracles
        self.is_world = backbone.name == "world"
        #: one request at a time touches the backbone and the personalizers (hooks, options), whatever the event
        self.lock = threading.RLock()
        #: folders under these roots may be loaded from the page (none by default: the box is not shown)
        self.load_roots: list[Path] = []

    # -- inputs ---------------------------------------------------------------------------------------------------

    def references(self, files: Sequence[str | os.PathLike] | None, identity: int | None = None, k: int = 1) -> torch.Tensor:
        """Uploaded files (checked: count, size, pixels, readable) or ``k`` renders of a held-out world identity →
        ``(k, 3, H, W)``."""
        files = [Path(f) for f in (files or []) if f]
        if files:
            if len(files) > self.limits.max_images:
                raise UIError(f"{len(files)} images uploaded; at most {self.limits.max_images}")
            images = []
            for f in files:
                if not f.is_file():
                    raise UIError(f"{f.name}: the upload did not arrive")
                if f.stat().st_size > self.limits.max_file_mb * 1e6:
                    raise UIError(f"{f.name} is {f.stat().st_size / 1e6:.1f} MB; at most {self.limits.max_file_mb:g} MB")
                try:
                    images.append(load_image(f, size=self.backbone.resolution, max_pixels=self.limits.max_pixels))
                except HyperboothError as e:
                    raise UIError(str(e).replace(str(f), f.name)) from None
            return torch.stack(images)
        if identity is not None:
            if not self.is_world:
                raise UIError("world identities exist only on the world's model; upload photos")
            from hyperbooth.world.fidelity import reference_images

            return reference_images(int(identity), max(1, int(k)), resolution=self.backbone.resolution)
        raise UIError(f"upload 1–{self.limits.max_images} reference images or pick a world identity")

    def prompts(self, text: str) -> list[str]:
        lines = [" ".join(line.split()) for line in (text or "").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise UIError("the prompt is empty: write one prompt per line (use the rare token, e.g. 'a sks toy in the snow')")
        if len(lines) > self.limits.max_prompts:
            raise UIError(f"{len(lines)} prompts; at most {self.limits.max_prompts}")
        long = next((line for line in lines if len(line) > self.limits.max_prompt_chars), None)
        if long is not None:
            raise UIError(f"a prompt has {len(long)} characters; at most {self.limits.max_prompt_chars}")
        return lines

    def _check_numbers(self, steps, num_images, seed, guidance, scale, w_base, w_pers, lora_scale) -> None:
        if not (isinstance(steps, (int, float)) and float(steps).is_integer() and self.limits.min_steps <= steps <= self.limits.max_steps):
            raise UIError(f"steps={steps!r}: choose {self.limits.min_steps}–{self.limits.max_steps}")
        if not (float(num_images).is_integer() and 1 <= num_images <= self.limits.max_outputs):
            raise UIError(f"images per prompt={num_images!r}: choose 1–{self.limits.max_outputs}")
        if not float(seed).is_integer() or seed < 0:
            raise UIError(f"seed={seed!r} must be a whole number >= 0")
        if guidance not in ("cfg", "hm-cfg"):
            raise UIError(f"guidance {guidance!r} must be CFG or HM-CFG")
        for name, value in (("CFG scale", scale), ("w_base", w_base), ("w_pers", w_pers), ("LoRA scale", lora_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 30):
                raise UIError(f"{name}={value!r} must be a number in [0, 30]")

    def add_folder(self, folder: str) -> str:
        """Serve one more personalizer folder (any registered method, built for this backbone), if it lies under one
        of ``load_roots`` (``hyperbooth ui --allow-load ROOT``); returns its label. A folder already served returns
        its label again."""
        from hyperbooth.personalize import load_personalizer

        text = (folder or "").strip()
        if not text:
            raise UIError("give a hypernetwork folder to load")
        path = Path(text).expanduser().resolve()
        if not any(path == root or root in path.parents for root in self.load_roots):
            raise UIError("loading folders from the page is off, or this folder is outside the ones allowed (hyperbooth ui --allow-load ROOT)")
        for label, (_, served) in self.personalizers.items():
            if served is not None and Path(served).resolve() == path:
                return label
        with self.lock:
            try:
                personalizer = load_personalizer(path)
                personalizer.check_backbone(self.backbone, source=path)
            except HyperboothError as e:
                raise UIError(str(e)) from None
            except Exception as e:  # a config that parses but does not describe a model
                raise UIError(f"{path} does not load ({type(e).__name__}: {e})") from None
            label = f"{personalizer.method} ({path.name})"
            while label in self.personalizers:
                label += "'"
            self.personalizers[label] = (personalizer.eval(), path)
        return label

    def personalizer(self, label: str) -> tuple[Personalizer, Path | None]:
        if label not in self.personalizers:
            raise UIError(f"unknown method {label!r}; choose one of {', '.join(self.personalizers)}")
        return self.personalizers[label]

    # -- work -----------------------------------------------------------------------------------------------------

    def personalize(self, refs: torch.Tensor, label: str, class_name: str = "", base_lora_scale: float | None = None) -> tuple[LoRAWeights, float]:
        """The subject's LoRA (N = 1 per component) and the milliseconds it took."""
        personalizer, _ = self.personalizer(label)
        options = {}
        if base_lora_scale is not None and "base_lora_scale" in getattr(type(personalizer.config), "INFERENCE_OPTIONS", ()):
            if not (isinstance(base_lora_scale, (int, float)) and math.isfinite(base_lora_scale) and 0 <= base_lora_scale <= 4):
                raise UIError(f"Base-LoRA scale={base_lora_scale!r} must be a number in [0, 4]")
            options["base_lora_scale"] = float(base_lora_scale)
        if personalizer.needs_class_names and not (class_name or "").strip():
            raise UIError(f"{label} fine-tunes on the references: give the subject's class (e.g. 'dog')")
        with self.lock:  # this request's options, restored after: another visitor's request never sees them
            before = {k: getattr(personalizer.config, k) for k in options}
            personalizer.with_options(**options)
            t0 = time.perf_counter()
            try:
                weights = personalizer.personalize(refs[None].to(personalizer.device), self.backbone,
                                                   class_names=[class_name.strip()] if personalizer.needs_class_names else None)
            except HyperboothError as e:
                raise UIError(str(e)) from None
            finally:
                personalizer.with_options(**before)
        return weights, (time.perf_counter() - t0) * 1e3

    def generate(self, weights, prompts: Sequence[str], guidance: str = "hm-cfg", guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                 w_base: float = DEFAULT_W_BASE, w_pers: float = DEFAULT_W_PERS, steps: int = 15, seed: int = 0, num_images: int = 1,
                 lora_scale: float = 1.0, progress: Callable[[float, str], None] | None = None,
                 identity: int | None = None) -> list[tuple[Image.Image, str]]:
        """Images with captions (prompt, seed, settings, and on the world for a picked identity its retrieval rank among
        8); ``progress(fraction, text)`` after every denoising step."""
        for name, value in (("steps", steps), ("images per prompt", num_images), ("seed", seed)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UIError(f"{name}={value!r} must be a number")
        if seed > 2**62:
            raise UIError(f"seed={seed!r}: at most 2^62")
        self._check_numbers(steps, num_images, seed, guidance, guidance_scale, w_base, w_pers, lora_scale)
        steps, num_images, seed = int(steps), int(num_images), int(seed)
        parts = {c: w.to(device=self.backbone.device, dtype=self.backbone.dtype) for c, w in as_components(weights).items()}
        total = steps * num_images
        out = []
        with self.lock:
            out = self._generate(parts, prompts, guidance, guidance_scale, w_base, w_pers, steps, seed, num_images, lora_scale, progress, identity, total)
        return out

    def _generate(self, parts, prompts, guidance, guidance_scale, w_base, w_pers, steps, seed, num_images, lora_scale, progress, identity, total):
        out = []
        for j in range(num_images):
            def step(i, t, x, j=j):
                if progress is not None:
                    progress((j * steps + i + 1) / total, f"image {j + 1} of {num_images}, step {i + 1} of {steps}")

            images = generate(self.backbone, list(prompts), weights=parts, guidance=guidance, guidance_scale=guidance_scale, w_base=w_base,
                              w_pers=w_pers, steps=steps, seed=seed + j, lora_scale=lora_scale, callback=step)
            ranks = self._ranks(images, identity)
            setting = f"CFG {guidance_scale:g}" if guidance == "cfg" else f"HM-CFG {w_base:g}/{w_pers:g}"
            for i, (image, prompt) in enumerate(zip(_images_to_pil(images), prompts)):
                caption = f"{prompt} — seed {seed + j}, {setting}, {steps} steps"
                if ranks is not None:
                    caption += f", identity rank {ranks[i]} of 8"
                out.append((image, caption))
        return out

    def _ranks(self, images: torch.Tensor, identity: int | None) -> list[int] | None:
        if identity is None or not self.is_world:
            return None
        if self._oracles is None:
            from hyperbooth.world.oracles import Oracles

            self._oracles = Oracles.load()
        from hyperbooth.world.fidelity import identity_retrieval

        return identity_retrieval(self._oracles, images, [int(identity)] * images.shape[0])["rank"].tolist()

    def interpolate(self, refs_a: torch.Tensor, refs_b: torch.Tensor, label: str, alpha: float, class_name: str = ""):
        """The LoRA at ``alpha`` between two subjects: in the method's coefficient space where it has one
        (HyperLoRA), else ``(1 − α) ΔW_a + α ΔW_b``."""
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1):
            raise UIError(f"interpolation α={alpha!r} must be in [0, 1]")
        personalizer, _ = self.personalizer(label)
        if hasattr(personalizer, "interpolate") and callable(personalizer.interpolate) and not personalizer.needs_class_names:
            with self.lock:
                return personalizer.interpolate(refs_a.to(personalizer.device), refs_b.to(personalizer.device), float(alpha))
        a, _ = self.personalize(refs_a, label, class_name)
        b, _ = self.personalize(refs_b, label, class_name)
        a, b = as_components(a), as_components(b)
        return {c: combine([a[c], b[c]], [1.0 - float(alpha), float(alpha)]) for c in a}

    def export(self, weights, label: str, layout: str = "diffusers") -> Path:
        """The subject's LoRA as a file to download (diffusers or kohya layout)."""
        if layout not in FORMATS:
            raise UIError(f"layout {layout!r} must be one of {', '.join(FORMATS)}")
        personalizer, folder = self.personalizer(label)
        path = self.out_dir / f"subject-{uuid.uuid4().hex[:12]}-{layout}.safetensors"
        parts = {c: w.select(0) for c, w in as_components(weights).items()}
        save_lora(path, parts, layout, models=self.backbone.components, **lora_provenance(personalizer, self.backbone, folder))
        return path

    def save_images(self, gallery: Sequence[tuple[Image.Image, str]]) -> list[Path]:
        paths = []
        stamp = uuid.uuid4().hex[:12]
        for i, (image, _) in enumerate(gallery):
            path = self.out_dir / f"image-{stamp}-{i:02d}.png"
            image.save(path)
            paths.append(path)
        return paths


def build_app(studio: Studio, identities: Sequence[int] = ()):
    """The gradio page over ``studio``; ``identities``: held-out world identities to pick from (world only)."""
    try:
        import gradio as gr
    except ImportError:  # pragma: no cover - the [ui] extra
        raise UIError("the web page needs gradio: pip install 'hyperbooth[ui]'") from None

    labels = list(studio.personalizers)

    def _run(files, identity, method, prompts, guidance, scale, w_base, w_pers, steps, seed, num_images, lora_scale, base_scale,
             class_name, layout, progress=gr.Progress()):
        try:
            uploads = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]
            seed_id = int(identity) if identity not in (None, "", "none") and not uploads else None  # photos win over a picked identity
            refs = studio.references(uploads, seed_id)
            lines = studio.prompts(prompts)
            weights, ms = studio.personalize(refs, method, class_name, base_scale)
            progress(0.0, desc="generating")
            gallery = studio.generate(weights, lines, "cfg" if guidance == "CFG" else "hm-cfg", scale, w_base, w_pers, steps, seed, num_images,
                                      lora_scale, progress=lambda f, text: progress(f, desc=text), identity=seed_id)
            lora = studio.export(weights, method, layout)
            images = studio.save_images(gallery)
        except HyperboothError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # never a bare "Error": the page names what went wrong (and the log has the rest)
            log.exception("the page's request failed")
            raise gr.Error(f"internal error ({type(e).__name__}: {e})") from None
        status = f"{method}: personalized in {ms:.0f} ms; {len(gallery)} image(s)."
        return gallery, str(lora), [str(p) for p in images], status

    def _interpolate(files_a, files_b, identity_a, identity_b, method, prompt, alpha, steps, seed, progress=gr.Progress()):
        try:
            ida = int(identity_a) if identity_a not in (None, "", "none") else None
            idb = int(identity_b) if identity_b not in (None, "", "none") else None
            a = studio.references([getattr(f, "name", f) for f in (files_a or [])], ida)
            b = studio.references([getattr(f, "name", f) for f in (files_b or [])], idb)
            if alpha is None:
                raise UIError("set the interpolation slider")
            weights = studio.interpolate(a, b, method, float(alpha))
            gallery = studio.generate(weights, studio.prompts(prompt)[:1], "hm-cfg", steps=steps, seed=seed,
                                      progress=lambda f, text: progress(f, desc=text))
        except HyperboothError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("the page's request failed")
            raise gr.Error(f"internal error ({type(e).__name__}: {e})") from None
        return gallery

    def _load(folder):
        try:
            label = studio.add_folder(folder)
        except HyperboothError as e:
            raise gr.Error(str(e)) from None
        return gr.update(choices=list(studio.personalizers), value=label)

    def _renders(identity):
        if identity in (None, "", "none"):
            return []
        try:
            refs = studio.references(None, int(identity))  # the render the page personalizes from
        except HyperboothError as e:
            raise gr.Error(str(e)) from None
        return [(im.resize((128, 128), Image.NEAREST), f"identity {identity}") for im in _images_to_pil(refs)]

    choices = ["none"] + [str(i) for i in identities]
    with gr.Blocks(title="hyperbooth", delete_cache=(3600, 3600)) as app:  # uploads and copies older than an hour go
        gr.Markdown("# hyperbooth\nReference photos → a LoRA in one pass of a hypernetwork → images. " + studio.limits.describe())
        with gr.Tab("Personalize"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="reference images", file_count="multiple", file_types=["image"], elem_id="refs")
                    identity = gr.Dropdown(choices, value="none", label="or a held-out world identity", visible=studio.is_world, elem_id="identity")
                    renders = gr.Gallery(label="its reference renders", columns=3, height=140, visible=studio.is_world, elem_id="renders")
                    method = gr.Dropdown(labels, value=labels[0], label="method", elem_id="method")
                    with gr.Row(visible=bool(studio.load_roots)):
                        folder = gr.Textbox(label="load another hypernetwork folder (under: " + ", ".join(map(str, studio.load_roots)) + ")",
                                            elem_id="folder", scale=3)
                        load = gr.Button("Load", elem_id="load", scale=1)
                    class_name = gr.Textbox(label="class (fine-tuning methods)", value="", elem_id="class")
                    prompts = gr.Textbox(label="prompts, one per line", value="a sks toy in the snow", lines=3, elem_id="prompts")
                    guidance = gr.Radio(["HM-CFG", "CFG"], value="HM-CFG", label="guidance", elem_id="guidance")
                    with gr.Row():
                        scale = gr.Number(DEFAULT_GUIDANCE_SCALE, label="CFG scale")
                        w_base = gr.Number(DEFAULT_W_BASE, label="w_base")
                        w_pers = gr.Number(DEFAULT_W_PERS, label="w_pers")
                    with gr.Row():
                        steps = gr.Slider(studio.limits.min_steps, studio.limits.max_steps, value=15, step=1, label="steps", elem_id="steps")
                        seed = gr.Number(0, label="seed", precision=0)
                        num_images = gr.Slider(1, studio.limits.max_outputs, value=1, step=1, label="images per prompt")
                    with gr.Row():
                        lora_scale = gr.Number(1.0, label="LoRA scale")
                        base_scale = gr.Number(0.25, label="Base-LoRA scale (HyperLoRA)")
                        layout = gr.Radio(list(FORMATS), value="diffusers", label="LoRA file layout")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    gallery = gr.Gallery(label="images", columns=2, elem_id="gallery")
                    status = gr.Markdown(elem_id="status")
                    lora_file = gr.File(label="the subject's LoRA", elem_id="lora")
                    image_files = gr.File(label="the images", file_count="multiple", elem_id="images")
            identity.change(_renders, identity, renders)
            if studio.load_roots:  # not even an API endpoint otherwise
                load.click(_load, folder, method, concurrency_id="model")
            run.click(_run, [files, identity, method, prompts, guidance, scale, w_base, w_pers, steps, seed, num_images, lora_scale, base_scale,
                             class_name, layout], [gallery, lora_file, image_files, status], concurrency_id="model")
        with gr.Tab("Interpolate"):
            with gr.Row():
                files_a = gr.File(label="subject A", file_count="multiple", file_types=["image"])
                files_b = gr.File(label="subject B", file_count="multiple", file_types=["image"])
            with gr.Row(visible=studio.is_world):
                identity_a = gr.Dropdown(choices, value="none", label="or world identity A")
                identity_b = gr.Dropdown(choices, value="none", label="or world identity B")
            method_i = gr.Dropdown(labels, value=labels[0], label="method")
            prompt_i = gr.Textbox(label="prompt", value="a sks toy")
            alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="A → B")
            steps_i = gr.Slider(studio.limits.min_steps, studio.limits.max_steps, value=15, step=1, label="steps")
            seed_i = gr.Number(0, label="seed", precision=0)
            go = gr.Button("Interpolate")
            out = gr.Gallery(label="interpolated", columns=1)
            go.click(_interpolate, [files_a, files_b, identity_a, identity_b, method_i, prompt_i, alpha, steps_i, seed_i], out, concurrency_id="model")
    return app.queue(default_concurrency_limit=1, max_size=256)
