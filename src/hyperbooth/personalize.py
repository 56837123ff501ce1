"""From a subject to a LoRA: reference photos through any registered method, a LoRA file, or a mix of LoRA files.

    backbone = load_backbone(folder)                          # or None: the shipped world model
    personalizer = load_personalizer(hypernet_folder)         # or None: the shipped e2e hypernetwork
    weights, ms = personalize(["dog1.jpg", "dog2.jpg"], personalizer, backbone)
    save_lora("dog.safetensors", weights, models=backbone.components, **lora_provenance(personalizer, backbone))

The command line (``hyperbooth personalize`` / ``generate``) and the web page call these functions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone
from hyperbooth.errors import ConfigError, LoRAFileError
from hyperbooth.faces import NoFaceError
from hyperbooth.images import image_files, load_image
from hyperbooth.lora.io import load_lora
from hyperbooth.lora.weights import LoRAWeights, combine
from hyperbooth.methods import SHIPPED_E2E, SHIPPED_HYPERDREAMBOOTH, SHIPPED_HYPERLORA, Personalizer, load
from hyperbooth.methods.base import METHODS, read_config, weights_digest

#: method → its checkpoint shipped inside the package (``--method NAME``)
SHIPPED = {"e2e": SHIPPED_E2E, "hyperdreambooth": SHIPPED_HYPERDREAMBOOTH, "hyperlora": SHIPPED_HYPERLORA}


def personalizer_folder(folder: str | os.PathLike | None = None, method: str | None = None) -> Path:
    """``folder``; else the shipped checkpoint of ``method`` (default e2e). A folder of another method than
    ``method``, a method without a shipped checkpoint, or one not shipped in this version is a ConfigError."""
    if folder is not None:
        folder = Path(folder)
        if method is not None and read_config(folder)["method"] != method:
            raise ConfigError(f"--method {method} but {folder} holds a {read_config(folder)['method']!r} personalizer; give one of the two")
        return folder
    method = method or "e2e"
    if method not in SHIPPED:
        known = f"methods with a shipped checkpoint: {', '.join(sorted(SHIPPED))}"
        if method in METHODS:
            raise ConfigError(f"--method {method} has no shipped checkpoint ({known}); pass --hypernet FOLDER, or use `hyperbooth finetune` for dreambooth-lora")
        raise ConfigError(f"--method {method!r} is not a registered method ({known})")
    if not (SHIPPED[method] / "hypernet_config.json").is_file():
        raise ConfigError(f"this version ships no {method} checkpoint yet; train one (README: HyperDreamBooth) and pass --hypernet FOLDER")
    return SHIPPED[method]


def load_personalizer(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu", method: str | None = None,
                      **options) -> Personalizer:
    """The personalizer saved in ``folder`` (any registered method; default: the shipped checkpoint of ``method``,
    e2e when that is None too), with inference ``options`` (e.g. ``iterations=2``, ``fast_finetune_steps=40``)."""
    return load(personalizer_folder(folder, method)).with_options(**options).to(device)


def load_references(paths: Sequence[str | os.PathLike], resolution: int) -> torch.Tensor:
    """Image files or folders of one subject → ``(k, 3, resolution, resolution)`` in [-1, 1]; every file is checked
    (a damaged or non-image file is named) before anything else is done."""
    return torch.stack([load_image(f, size=resolution) for f in image_files(list(paths))])


def personalize(images: Sequence[str | os.PathLike] | torch.Tensor, personalizer: Personalizer, backbone: Backbone,
                class_name: str | None = None) -> tuple[LoRAWeights, float]:
    """One subject's references (files, folders, or a ``(k, 3, H, W)`` tensor) → (its LoRA, milliseconds taken).

    The personalizer is checked against the backbone first: one trained for another backbone (other target names
    or shapes) is refused with the first target that differs."""
    personalizer.check_backbone(backbone)
    files = None if isinstance(images, torch.Tensor) else image_files(list(images))
    refs = images if files is None else load_references(files, backbone.resolution)
    if personalizer.needs_class_names and not class_name:
        raise ConfigError(f"method {personalizer.method!r} needs the subject's class name (e.g. 'dog')")
    t0 = time.perf_counter()
    try:
        weights = personalizer.personalize(refs[None].to(personalizer.device), backbone, class_names=[class_name] if class_name else None)
    except NoFaceError as e:  # a reference without a face (HyperLoRA on faces): name its file
        if files is None or e.index is None or not 0 <= e.index < len(files):
            raise
        raise NoFaceError(f"{files[e.index]}: {str(e).split(': ', 1)[-1]}", index=e.index) from None
    return weights, (time.perf_counter() - t0) * 1e3


def parse_options(text: str, what: str = "--with") -> dict:
    """``"iterations=2,fast_finetune_steps=40"`` → ``{"iterations": 2, "fast_finetune_steps": 40}`` (values read as
    YAML scalars); ``""`` → ``{}``; a malformed item is named."""
    import yaml

    options = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {text!r}: {item!r} is not KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{what} {text!r}: cannot read the value of {key.strip()!r}") from None
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as text
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        options[key.strip().replace("-", "_")] = parsed
    return options


def lora_provenance(personalizer: Personalizer, backbone: Backbone, folder: str | os.PathLike | None = None) -> dict:
    """``save_lora`` keyword arguments that record the method, the hypernetwork (folder name and weights digest) and
    the backbone that made a LoRA file."""
    extra = {"hyperbooth.backbone": backbone.name, **personalizer.subject_metadata()}
    if folder is not None:
        folder = Path(folder)
        extra["hyperbooth.hypernet"] = f"{folder.name} sha256:{weights_digest(folder)}"
    return {"method": personalizer.method, "base_model": backbone.path.name, "extra_metadata": extra}


def parse_mix(specs: Sequence[str]) -> list[tuple[Path, float]]:
    """``["a.safetensors:0.5", …]`` → ``[(Path("a.safetensors"), 0.5), …]``; a bad spec is named."""
    out = []
    for spec in specs:
        path, sep, weight = spec.rpartition(":")
        try:
            value = float(weight) if sep and path else float("nan")
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise ConfigError(f"--mix {spec!r}: expected FILE:WEIGHT with a finite number as weight, e.g. a.safetensors:0.5")
        out.append((Path(path), value))
    return out


def mix_loras(files: Sequence[tuple[Path, float]], models: Mapping[str, nn.Module] | nn.Module,
              personalizer: Personalizer | None = None) -> dict[str, LoRAWeights]:
    """``Σ_i w_i · ΔW_i`` of LoRA files, per component, exact in ΔW space (:func:`~hyperbooth.lora.weights.combine`).
    With the HyperLoRA ``personalizer`` that made every file (their headers carry its coefficients), the mix is
    ``Σ_i w_i c_i`` in its coefficient space instead, as the method interpolates subjects.

    ``models``: the backbone's components (or its UNet), which every file is checked against. The files must hold
    the same components (a text-encoder LoRA in one and not another is refused, not dropped) and target the same
    modules. Returns component → the mixed LoRA."""
    files_loaded = [load_lora(path, models) for path, _ in files]
    if personalizer is not None and hasattr(personalizer, "coefficients_from_metadata"):
        coeffs = [personalizer.coefficients_from_metadata(f.metadata, str(f.path)) for f in files_loaded]
        if all(c is not None for c in coeffs):
            return {"unet": personalizer.mix(coeffs, [w for _, w in files])}
        plain = next(f.path for f, c in zip(files_loaded, coeffs) if c is None)
        raise ConfigError(f"{plain} holds no HyperLoRA coefficients: mix it without --hypernet (in ΔW)")
    loaded = [f.components for f in files_loaded]
    first_path, first = files[0][0], loaded[0]
    for (path, _), comps in zip(files[1:], loaded[1:]):
        if set(comps) != set(first):
            raise LoRAFileError(f"{path} holds components {sorted(comps)} but {first_path} holds {sorted(first)}; they cannot be mixed")
        for comp, lora in comps.items():
            if set(lora) != set(first[comp]):
                odd = sorted(set(lora) ^ set(first[comp]))[0]
                raise LoRAFileError(f"{path} and {first_path} target different {comp} modules (first difference: {odd!r}); they cannot be mixed")
    weights = [w for _, w in files]
    return {comp: combine([comps[comp] for comps in loaded], weights) for comp in first}
