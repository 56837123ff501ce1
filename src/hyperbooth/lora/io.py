"""LoRA files: `.safetensors` in the diffusers/PEFT layout or the kohya layout, with hyperbooth's metadata.

- **diffusers** (what ``StableDiffusionPipeline.load_lora_weights`` reads natively)::

      unet.<module>.lora_A.weight            (r, d_in)       [(r, d_in, 1, 1) for a 1x1 conv]
      unet.<module>.lora_B.weight            (d_out, r)      [(d_out, r, 1, 1)]
      text_encoder.<module>.lora_A.weight …

  PEFT's convention is ``ΔW = (lora_alpha / r) · B A`` with ``lora_alpha`` in the header's
  ``lora_adapter_metadata``; loaders that ignore the header assume ``alpha = r``. So hyperbooth folds the scale
  into ``lora_B`` and writes ``alpha = r``: every reader gets the same ΔW.
- **kohya** (A1111, ComfyUI, and diffusers through its converter)::

      lora_unet_<module with . → _>.lora_down.weight   (r, d_in)
      lora_unet_<…>.lora_up.weight                     (d_out, r)
      lora_unet_<…>.alpha                              ()          ΔW = (alpha / r) · up · down
      lora_te_<…>                                      (text encoder)

Every file carries in its header: ``hyperbooth.format_version``, ``hyperbooth.version``, ``hyperbooth.method``,
``hyperbooth.rank``, ``hyperbooth.alpha``, ``hyperbooth.base_model`` and ``hyperbooth.targets`` (the module names,
which make the kohya names reversible without a model).

Pickles (``.bin``, ``.pt``, ``.ckpt`` …) are refused: unpickling a file can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import hyperbooth
from hyperbooth.errors import ConfigError, LoRAFileError
from hyperbooth.files import atomic_write
from hyperbooth.lora.inject import base_module, check_compatible
from hyperbooth.lora.weights import LoRALayer, LoRAWeights

FORMAT_VERSION = "1"
FORMATS = ("diffusers", "kohya")
#: component → (diffusers key prefix, kohya key prefix)
COMPONENTS: dict[str, tuple[str, str]] = {"unet": ("unet", "lora_unet"), "text_encoder": ("text_encoder", "lora_te")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class LoRAFile:
    """What a LoRA file holds: LoRAWeights per component (``"unet"``, ``"text_encoder"``), its format, its header."""

    path: Path
    format: str
    components: dict[str, LoRAWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    conv_modules: dict[str, set[str]] = field(default_factory=dict)  # component → names stored 4-D (1x1 convs)

    @property
    def unet(self) -> LoRAWeights:
        if "unet" not in self.components:
            raise LoRAFileError(f"{self.path}: holds no UNet LoRA (components: {', '.join(self.components)})")
        return self.components["unet"]


def _as_components(weights: LoRAWeights | Mapping[str, LoRAWeights]) -> dict[str, LoRAWeights]:
    comps = {"unet": weights} if isinstance(weights, LoRAWeights) else dict(weights)
    for name, w in comps.items():
        if name not in COMPONENTS:
            raise ConfigError(f"unknown LoRA component {name!r}; choose from {', '.join(COMPONENTS)}")
        if w.num_subjects != 1:
            raise ConfigError(f"a LoRA file holds one subject; component {name!r} has N={w.num_subjects} (use .select(i))")
    return comps


def _conv_names(model: nn.Module | None) -> set[str]:
    if model is None:
        return set()
    return {name for name, m in model.named_modules() if isinstance(base_module(m), nn.Conv2d)}


CHECKSUM_KEY = "hyperbooth.sha256"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes in name order: written into hyperbooth's LoRA files
    and checked when one is read, so a flipped bit in the data (which safetensors itself does not notice) is caught."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_lora(
    path: str | os.PathLike,
    weights: LoRAWeights | Mapping[str, LoRAWeights],
    format: str = "diffusers",
    *,
    models: Mapping[str, nn.Module] | None = None,
    conv_modules: Mapping[str, set[str]] | None = None,
    method: str = "unknown",
    base_model: str = "unknown",
    dtype: torch.dtype | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one subject's LoRA (a :class:`LoRAWeights` for the UNet, or ``{"unet": …, "text_encoder": …}``).

    ``models`` (component → module) checks names and shapes before writing and tells which targets are 1x1 convs
    (saved 4-D, as PEFT and kohya expect); without a model, ``conv_modules`` (component → names) tells. The file is written atomically: a failure leaves no partial file.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"LoRA files are written as .safetensors; got {str(path)!r}")
    comps = _as_components(weights)
    models = dict(models or {})
    for comp, w in comps.items():
        if comp in models:
            check_compatible(models[comp], w, source=f"LoRA component {comp!r}")

    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, object] = {}
    targets: dict[str, list[str]] = {}
    for comp, w in comps.items():
        convs = _conv_names(models.get(comp)) | set((conv_modules or {}).get(comp, ()))
        diff_prefix, kohya_prefix = COMPONENTS[comp]
        targets[comp] = list(w)
        if format == "diffusers":
            w = w.with_unit_scale()
        for name, layer in w.items():
            down, up = layer.A[0], layer.B[0]  # (r, d_in), (d_out, r)
            if name in convs:
                down, up = down[:, :, None, None], up[:, :, None, None]
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            down, up = down.detach().contiguous().cpu(), up.detach().contiguous().cpu()
            if format == "diffusers":
                tensors[f"{diff_prefix}.{name}.lora_A.weight"] = down
                tensors[f"{diff_prefix}.{name}.lora_B.weight"] = up
            else:
                key = f"{kohya_prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        if format == "diffusers":
            ranks = w.ranks
            common = max(set(ranks.values()), key=list(ranks.values()).count)
            adapter_meta.update({
                f"{diff_prefix}.r": common,
                f"{diff_prefix}.lora_alpha": common,
                f"{diff_prefix}.target_modules": sorted(w),
                f"{diff_prefix}.rank_pattern": {n: r for n, r in ranks.items() if r != common},
                f"{diff_prefix}.alpha_pattern": {n: r for n, r in ranks.items() if r != common},
            })

    all_layers = [layer for w in comps.values() for layer in w.values()]
    metadata = {
        "format": "pt",
        "hyperbooth.format_version": FORMAT_VERSION,
        "hyperbooth.version": hyperbooth.__version__,
        "hyperbooth.format": format,
        "hyperbooth.method": method,
        "hyperbooth.base_model": base_model,
        "hyperbooth.rank": str(max(layer.rank for layer in all_layers)),
        "hyperbooth.alpha": str(max(layer.alpha for layer in all_layers)),
        "hyperbooth.targets": json.dumps(targets),
    }
    if format == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(adapter_meta, sort_keys=True)
    else:
        metadata.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": metadata["hyperbooth.rank"],
            "ss_network_alpha": metadata["hyperbooth.alpha"],
        })
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = str(value)
    metadata[CHECKSUM_KEY] = tensors_digest(tensors)
    _atomic_save(tensors, path, metadata)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, turning every way it can be wrong into a :class:`LoRAFileError` naming it."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoRAFileError(
            f"{path}: {path.suffix} files are Python pickles, which can run arbitrary code when loaded; hyperbooth "
            "only reads .safetensors (convert it with safetensors.torch.save_file in an environment you trust)"
        )
    if not path.is_file():
        raise LoRAFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise LoRAFileError(f"{path}: file is truncated or empty ({size} bytes); not a safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > size - 8 or head[8:9] != b"{":
        if head.startswith(b"PK\x03\x04") or (head[0] == 0x80 and 2 <= head[1] <= 5):
            raise LoRAFileError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; hyperbooth refuses pickles because they can run code")
        raise LoRAFileError(f"{path}: header claims {header_len} bytes but the file has {size}; the file is truncated or not safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of corruption
        raise LoRAFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, metadata


def _detect_format(path: Path, keys) -> str:
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    first = next(iter(keys), None)
    raise LoRAFileError(f"{path}: not a LoRA file in diffusers or kohya layout (first key: {first!r})")


def _json_header(path: Path, metadata: Mapping[str, str], key: str) -> dict:
    """A JSON object stored in the header under ``key`` ({} when absent); anything else is named."""
    try:
        value = json.loads(metadata.get(key, "{}") or "{}")
    except ValueError:
        raise LoRAFileError(f"{path}: header entry {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise LoRAFileError(f"{path}: header entry {key!r} is not a JSON object")
    return value


def _parse_diffusers(path: Path, tensors, metadata) -> dict[str, dict[str, tuple[LoRALayer, bool]]]:
    adapter_meta = _json_header(path, metadata, "lora_adapter_metadata")
    prefixes = {diff: comp for comp, (diff, _) in COMPONENTS.items()}
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        comp_prefix, _, rest = key.partition(".")
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if comp_prefix in prefixes and rest.endswith(suffix):
                pairs.setdefault((prefixes[comp_prefix], rest[: -len(suffix)]), {})[part] = value
                break
        else:
            raise LoRAFileError(f"{path}: unknown key {key!r} (expected '<unet|text_encoder>.<module>.lora_A.weight' / 'lora_B.weight')")
    out: dict[str, dict[str, tuple[LoRALayer, bool]]] = {}
    for (comp, name), parts in pairs.items():
        diff_prefix = COMPONENTS[comp][0]
        if "A" not in parts or "B" not in parts:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise LoRAFileError(f"{path}: key '{diff_prefix}.{name}.{missing}.weight' is missing (its pair is present)")
        rank = parts["A"].shape[0]
        try:
            alpha_pattern = adapter_meta.get(f"{diff_prefix}.alpha_pattern") or {}
            rank_pattern = adapter_meta.get(f"{diff_prefix}.rank_pattern") or {}
            alpha = alpha_pattern.get(name, adapter_meta.get(f"{diff_prefix}.lora_alpha", rank))
            r_meta = rank_pattern.get(name, adapter_meta.get(f"{diff_prefix}.r", rank))
            # PEFT scales by lora_alpha / r where r comes from the config: honour that ratio with the real rank.
            alpha = float(alpha) * rank / float(r_meta)
        except (AttributeError, TypeError, ValueError, ZeroDivisionError):
            raise LoRAFileError(f"{path}: header 'lora_adapter_metadata' gives no usable alpha / r for {diff_prefix}.{name}") from None
        out.setdefault(comp, {})[name] = _layer(path, f"{diff_prefix}.{name}", parts["A"], parts["B"], alpha)
    return out


def _parse_kohya(path: Path, tensors, metadata, models: Mapping[str, nn.Module]) -> dict[str, dict[str, tuple[LoRALayer, bool]]]:
    kohya_to_comp = {kohya: comp for comp, (_, kohya) in COMPONENTS.items()}
    known_names: dict[str, str] = {}  # kohya module key → (component, module name)
    targets = _json_header(path, metadata, "hyperbooth.targets")
    for comp, names in targets.items():
        if comp not in COMPONENTS:
            raise LoRAFileError(f"{path}: header 'hyperbooth.targets' names unknown component {comp!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LoRAFileError(f"{path}: header 'hyperbooth.targets' must list module names for {comp!r}")
        for name in names:
            known_names[f"{COMPONENTS[comp][1]}_{name.replace('.', '_')}"] = (comp, name)
    for comp, model in models.items():
        for name, _ in model.named_modules():
            if name:
                known_names.setdefault(f"{COMPONENTS[comp][1]}_{name.replace('.', '_')}", (comp, name))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_key, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha") or not module_key.startswith(tuple(f"{k}_" for k in kohya_to_comp)):
            raise LoRAFileError(f"{path}: unknown key {key!r} (expected 'lora_unet_…' / 'lora_te_…' with lora_down.weight, lora_up.weight, alpha)")
        groups.setdefault(module_key, {})[part] = value
    out: dict[str, dict[str, tuple[LoRALayer, bool]]] = {}
    for module_key, parts in groups.items():
        for need in ("lora_down.weight", "lora_up.weight"):
            if need not in parts:
                raise LoRAFileError(f"{path}: key '{module_key}.{need}' is missing (the rest of that module is present)")
        if module_key not in known_names:
            hint = "the model has no such module" if models else "a kohya file without hyperbooth metadata needs the model to resolve its names"
            raise LoRAFileError(f"{path}: cannot resolve key '{module_key}.lora_down.weight' to a module ({hint})")
        comp, name = known_names[module_key]
        down = parts["lora_down.weight"]
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise LoRAFileError(f"{path}: key '{module_key}.alpha' holds {parts['alpha'].numel()} numbers, not one")
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        out.setdefault(comp, {})[name] = _layer(path, module_key, down, parts["lora_up.weight"], alpha)
    return out


def _layer(path: Path, key: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> tuple[LoRALayer, bool]:
    """One module's factors from a file, as (layer, stored 4-D as a 1x1 conv)."""
    conv = down.ndim == 4
    if down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise LoRAFileError(f"{path}: key {key!r} has down/A {tuple(down.shape)} and up/B {tuple(up.shape)}, which do not form a LoRA")
    if up.dtype != down.dtype:
        up = up.to(down.dtype)
    try:
        return LoRALayer(down[None], up[None], alpha), conv
    except ConfigError as e:
        raise LoRAFileError(f"{path}: key {key!r}: {e}") from None


def load_lora(
    path: str | os.PathLike,
    models: Mapping[str, nn.Module] | nn.Module | None = None,
    *,
    require_targets: Mapping[str, list[str]] | None = None,
) -> LoRAFile:
    """Read a LoRA file in either layout; with ``models``, check it against them.

    ``models``: a module (the UNet) or component → module. The check raises :class:`LoRAFileError` naming the
    first unknown key, missing pair, module absent from the model, or shape mismatch. ``require_targets``
    (component → module names) also requires those modules to be present in the file.
    """
    path = Path(path)
    if isinstance(models, nn.Module):
        models = {"unet": models}
    models = dict(models or {})
    tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise LoRAFileError(f"{path}: the file holds no tensors")
    if CHECKSUM_KEY in metadata and metadata[CHECKSUM_KEY] != tensors_digest(tensors):
        raise LoRAFileError(f"{path}: the tensors do not match the checksum hyperbooth wrote with them; the file is corrupted")
    fmt = _detect_format(path, tensors.keys())
    layers = _parse_diffusers(path, tensors, metadata) if fmt == "diffusers" else _parse_kohya(path, tensors, metadata, models)
    conv_modules = {comp: {n for n, (_, conv) in comp_layers.items() if conv} for comp, comp_layers in layers.items()}
    components = {}
    for comp, comp_layers in layers.items():
        try:
            components[comp] = LoRAWeights({n: layer for n, (layer, _) in comp_layers.items()})
        except ConfigError as e:
            raise LoRAFileError(f"{path}: {e}") from None
    for comp, model in models.items():
        if comp in components:
            check_compatible(model, components[comp], source=str(path))
    for comp, names in (require_targets or {}).items():
        have = components.get(comp, {})
        for name in names:
            if name not in have:
                raise LoRAFileError(f"{path}: target module {name!r} of component {comp!r} is missing from the file")
    return LoRAFile(path=path, format=fmt, components=components, metadata=metadata, conv_modules=conv_modules)
