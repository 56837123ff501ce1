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

  For SDXL (``backbone="sdxl"``) kohya names follow kohya's SDXL trainer, which A1111 and ComfyUI read: the UNet's
  modules by the original SGM UNet's names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
  :mod:`hyperbooth.lora.sgm`), the text encoders as ``lora_te1_…`` and ``lora_te2_…``; the header then records the
  UNet's block layout (``hyperbooth.unet_layout``), so the names map back without the model. Reading accepts both
  namings of the UNet, and ``lora_te_``/``lora_te1_`` for the first text encoder.

Every file carries in its header: ``hyperbooth.format_version``, ``hyperbooth.version``, ``hyperbooth.method``,
``hyperbooth.rank``, ``hyperbooth.alpha``, ``hyperbooth.base_model`` and ``hyperbooth.targets`` (the module names,
which make the kohya names reversible without a model), and ``hyperbooth.backbone`` when it is known.

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
from hyperbooth.lora.sgm import SDXL_LAYOUT, UNetLayout, to_sgm
from hyperbooth.lora.weights import LoRALayer, LoRAWeights

FORMAT_VERSION = "1"
FORMATS = ("diffusers", "kohya")
#: component → (diffusers key prefix, kohya key prefix)
#: a DiT's denoiser (SD3, ``backbone.denoiser == "transformer"``): diffusers' ``transformer.<module>``; kohya-style
#: ``lora_transformer_<module with . → _>``, the layout (OneTrainer's) that ComfyUI reads for SD3 beside diffusers'
COMPONENTS: dict[str, tuple[str, str]] = {
    "unet": ("unet", "lora_unet"),
    "text_encoder": ("text_encoder", "lora_te"),
    "text_encoder_2": ("text_encoder_2", "lora_te2"),
    "transformer": ("transformer", "lora_transformer"),
}
#: backbones whose kohya files name the UNet's modules the SGM way and the text encoders lora_te1 / lora_te2
SGM_BACKBONES = ("sdxl",)
SGM_KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
#: every kohya prefix read, → component
KOHYA_READ_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                       "lora_transformer": "transformer"}
LAYOUT_KEY = "hyperbooth.unet_layout"
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
        """The denoiser's LoRA: component ``"unet"``, or ``"transformer"`` for a DiT."""
        for name in ("unet", "transformer"):
            if name in self.components:
                return self.components[name]
        raise LoRAFileError(f"{self.path}: holds no UNet LoRA (components: {', '.join(self.components)})")


def _as_components(weights: LoRAWeights | Mapping[str, LoRAWeights], models: Mapping[str, nn.Module] | None = None) -> dict[str, LoRAWeights]:
    comps = {"unet": weights} if isinstance(weights, LoRAWeights) else dict(weights)
    if "transformer" in (models or {}) and "unet" not in (models or {}) and "unet" in comps and "transformer" not in comps:
        comps["transformer"] = comps.pop("unet")  # the denoiser's LoRA as methods name it, for a DiT's transformer
    for name, w in comps.items():
        if name not in COMPONENTS:
            raise ConfigError(f"unknown LoRA component {name!r}; choose from {', '.join(COMPONENTS)}")
        if w.num_subjects != 1:
            raise ConfigError(f"a LoRA file holds one subject; component {name!r} has N={w.num_subjects} (use .select(i))")
    return comps


def unet_layout(model: nn.Module | None, metadata: Mapping[str, str] | None = None) -> UNetLayout:
    """The SGM block layout of a UNet: from the model's config, else from a file header's ``hyperbooth.unet_layout``,
    else SDXL 1.0's."""
    config = getattr(model, "config", None)
    if config is not None and "down_block_types" in config:
        return UNetLayout.from_config(config)
    if metadata and metadata.get(LAYOUT_KEY):
        try:
            return UNetLayout.from_json(metadata[LAYOUT_KEY])
        except (ValueError, KeyError, TypeError):
            raise LoRAFileError(f"header entry {LAYOUT_KEY!r} is not a UNet layout: {metadata[LAYOUT_KEY][:200]!r}") from None
    return SDXL_LAYOUT


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
    backbone: str | None = None,
) -> Path:
    """Write one subject's LoRA (a :class:`LoRAWeights` for the UNet, or ``{"unet": …, "text_encoder": …}``).

    ``models`` (component → module) checks names and shapes before writing and tells which targets are 1x1 convs
    (saved 4-D, as PEFT and kohya expect); without a model, ``conv_modules`` (component → names) tells. The file is written atomically: a failure leaves no partial file.
    ``backbone`` (default: ``extra_metadata["hyperbooth.backbone"]``) is recorded in the header and picks the kohya
    naming: SGM names for ``"sdxl"`` (the UNet's layout from ``models["unet"]``, else the header entry
    ``hyperbooth.unet_layout`` in ``extra_metadata``, else SDXL 1.0's), diffusers' module names otherwise.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"LoRA files are written as .safetensors; got {str(path)!r}")
    comps = _as_components(weights, models)
    models = dict(models or {})
    for comp, w in comps.items():
        if comp in models:
            check_compatible(models[comp], w, source=f"LoRA component {comp!r}")
    backbone = backbone or str((extra_metadata or {}).get("hyperbooth.backbone", "")) or None
    sgm = format == "kohya" and backbone in SGM_BACKBONES
    layout = unet_layout(models.get("unet"), extra_metadata) if sgm else None

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
                key = _kohya_key(comp, name, layout) if sgm else f"{kohya_prefix}_{clip_text_name(name).replace('.', '_')}"
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
    if backbone:
        metadata["hyperbooth.backbone"] = backbone
    if format == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(adapter_meta, sort_keys=True)
    else:
        metadata.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": metadata["hyperbooth.rank"],
            "ss_network_alpha": metadata["hyperbooth.alpha"],
        })
        if sgm:
            metadata[LAYOUT_KEY] = layout.to_json()
            metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = str(value)
    metadata[CHECKSUM_KEY] = tensors_digest(tensors)
    _atomic_save(tensors, path, metadata)
    return path


#: the first name parts of a CLIP text tower's layers (transformers' CLIPTextModel keeps them under ``text_model.``
#: up to v4, at its top from v5 on; CLIPTextModelWithProjection keeps ``text_model.``)
_CLIP_TEXT_PARTS = ("embeddings.", "encoder.layers.", "final_layer_norm")


def clip_text_name(name: str) -> str:
    """A CLIP text encoder's module name as kohya, A1111 and ComfyUI spell it, under ``text_model.`` whichever
    transformers version built the model (other names, a T5's ``encoder.block.…`` among them, as they are)."""
    return f"text_model.{name}" if name.startswith(_CLIP_TEXT_PARTS) else name


def _kohya_key(comp: str, name: str, layout: UNetLayout) -> str:
    """The kohya module key of ``name`` in an SDXL file: SGM names for the UNet, lora_te1 / lora_te2."""
    if comp != "unet":
        return f"{SGM_KOHYA_PREFIXES[comp]}_{clip_text_name(name).replace('.', '_')}"
    sgm_name = to_sgm(name, layout)
    if sgm_name is None:
        raise ConfigError(f"UNet module {name!r} has no name in the original (SGM) UNet, so kohya's SDXL layout cannot hold it; "
                          "save it in the diffusers layout")
    return f"lora_unet_{sgm_name.replace('.', '_')}"


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


#: what a parser returns: component → module → (layer, stored 4-D), and component → module → the file's key for it
Parsed = tuple[dict[str, dict[str, tuple[LoRALayer, bool]]], dict[str, dict[str, str]]]


def _parse_diffusers(path: Path, tensors, metadata) -> Parsed:
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
            raise LoRAFileError(f"{path}: unknown key {key!r} (expected '<{'|'.join(prefixes)}>.<module>.lora_A.weight' / 'lora_B.weight')")
    out: dict[str, dict[str, tuple[LoRALayer, bool]]] = {}
    keys: dict[str, dict[str, str]] = {}
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
        keys.setdefault(comp, {})[name] = f"{diff_prefix}.{name}.lora_A.weight"
    return out, keys


def _kohya_names(comp: str, name: str, layout: UNetLayout | None) -> list[str]:
    """Every kohya module key that reads as module ``name`` of ``comp``: diffusers' name with ``.`` → ``_`` under each
    prefix of the component (a CLIP text encoder's with and without ``text_model.``), and for the UNet (given its
    ``layout``) the SGM name too."""
    spellings = {name, clip_text_name(name), name.removeprefix("text_model.")} if comp.startswith("text_encoder") else {name}
    names = [f"{prefix}_{n.replace('.', '_')}" for prefix, c in KOHYA_READ_PREFIXES.items() if c == comp for n in sorted(spellings)]
    if comp == "unet" and layout is not None:
        sgm_name = to_sgm(name, layout)
        if sgm_name is not None:
            names.append(f"lora_unet_{sgm_name.replace('.', '_')}")
    return names


def _parse_kohya(path: Path, tensors, metadata, models: Mapping[str, nn.Module]) -> Parsed:
    known_names: dict[str, tuple[str, str]] = {}  # kohya module key → (component, module name)
    targets = _json_header(path, metadata, "hyperbooth.targets")
    sgm_file = LAYOUT_KEY in metadata or metadata.get("hyperbooth.backbone") in SGM_BACKBONES
    try:
        header_layout = unet_layout(None, metadata) if sgm_file else None
    except LoRAFileError as e:
        raise LoRAFileError(f"{path}: {e}") from None
    for comp, names in targets.items():
        if comp not in COMPONENTS:
            raise LoRAFileError(f"{path}: header 'hyperbooth.targets' names unknown component {comp!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LoRAFileError(f"{path}: header 'hyperbooth.targets' must list module names for {comp!r}")
        for name in names:
            for key in _kohya_names(comp, name, header_layout):
                known_names[key] = (comp, name)
    for comp, model in models.items():
        config = getattr(model, "config", None)
        layout = UNetLayout.from_config(config) if comp == "unet" and config is not None and "down_block_types" in config else None
        for name, _ in model.named_modules():
            if name:
                for key in _kohya_names(comp, name, layout):
                    known_names.setdefault(key, (comp, name))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_key, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha") or not module_key.startswith(tuple(f"{k}_" for k in KOHYA_READ_PREFIXES)):
            raise LoRAFileError(f"{path}: unknown key {key!r} (expected 'lora_unet_…' / 'lora_te_…' / 'lora_te1_…' / 'lora_te2_…' "
                                "with lora_down.weight, lora_up.weight, alpha)")
        groups.setdefault(module_key, {})[part] = value
    out: dict[str, dict[str, tuple[LoRALayer, bool]]] = {}
    keys: dict[str, dict[str, str]] = {}
    for module_key, parts in groups.items():
        for need in ("lora_down.weight", "lora_up.weight"):
            if need not in parts:
                raise LoRAFileError(f"{path}: key '{module_key}.{need}' is missing (the rest of that module is present)")
        if module_key not in known_names:
            hint = "the model has no such module" if models else "a kohya file without hyperbooth metadata needs the model to resolve its names"
            made_for = metadata.get("hyperbooth.backbone")
            if models and made_for:
                hint += f"; the file was made for the {made_for} backbone"
            raise LoRAFileError(f"{path}: cannot resolve key '{module_key}.lora_down.weight' to a module ({hint})")
        comp, name = known_names[module_key]
        down = parts["lora_down.weight"]
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise LoRAFileError(f"{path}: key '{module_key}.alpha' holds {parts['alpha'].numel()} numbers, not one")
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        out.setdefault(comp, {})[name] = _layer(path, module_key, down, parts["lora_up.weight"], alpha)
        keys.setdefault(comp, {})[name] = f"{module_key}.lora_down.weight"
    return out, keys


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
    first unknown key, missing pair, module absent from the model, or shape mismatch (with the file's key, and the
    backbone the file was made for when its header says). ``require_targets``
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
    layers, file_keys = _parse_diffusers(path, tensors, metadata) if fmt == "diffusers" else _parse_kohya(path, tensors, metadata, models)
    conv_modules = {comp: {n for n, (_, conv) in comp_layers.items() if conv} for comp, comp_layers in layers.items()}
    components = {}
    for comp, comp_layers in layers.items():
        try:
            components[comp] = LoRAWeights({n: layer for n, (layer, _) in comp_layers.items()})
        except ConfigError as e:
            raise LoRAFileError(f"{path}: {e}") from None
    made_for = metadata.get("hyperbooth.backbone")
    for comp, model in models.items():
        if comp in components:
            try:
                check_compatible(model, components[comp], source=str(path), keys=file_keys.get(comp))
            except LoRAFileError as e:
                raise LoRAFileError(f"{e}; the file was made for the {made_for} backbone" if made_for else str(e)) from None
    for comp, names in (require_targets or {}).items():
        have = components.get(comp, {})
        for name in names:
            if name not in have:
                raise LoRAFileError(f"{path}: target module {name!r} of component {comp!r} is missing from the file")
    return LoRAFile(path=path, format=fmt, components=components, metadata=metadata, conv_modules=conv_modules)
