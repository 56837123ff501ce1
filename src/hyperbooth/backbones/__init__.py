"""Backbones: the frozen text-to-image models that methods personalize, behind one interface
(:class:`~hyperbooth.backbones.base.Backbone`), and :func:`load_backbone`, which picks the class from a folder's
``model_index.json``.

    backbone = load_backbone("path/to/stable-diffusion-v1-5")   # StableDiffusionBackbone
    backbone = load_backbone(None)                               # the shipped world model (WorldBackbone)

A new architecture is one module with a ``Backbone`` subclass naming its ``pipeline_classes``, listed in
:data:`BACKBONES`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from hyperbooth.backbones.base import Backbone, ComponentLoRA, Conditioning, as_components
from hyperbooth.backbones.sd import StableDiffusionBackbone
from hyperbooth.backbones.sdxl import StableDiffusionXLBackbone
from hyperbooth.backbones.sd3 import StableDiffusion3Backbone
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

#: Every backbone class; ``load_backbone`` maps a ``model_index.json`` ``_class_name`` to one of them.
BACKBONES: tuple[type[Backbone], ...] = (WorldBackbone, StableDiffusionBackbone, StableDiffusionXLBackbone)
BACKBONES += (StableDiffusion3Backbone,)  # a DiT: SD3 / 3.5


def backbone_class(pipeline_class: str, source: str = "model_index.json") -> type[Backbone]:
    for cls in BACKBONES:
        if pipeline_class in cls.pipeline_classes:
            return cls
    known = ", ".join(name for cls in BACKBONES for name in cls.pipeline_classes)
    raise CheckpointError(f"{source} names pipeline {pipeline_class!r}, which hyperbooth has no backbone for (it reads: {known})")


def _model_index(folder_or_id: str) -> tuple[dict, str]:
    path = Path(folder_or_id)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise CheckpointError(f"{path} is neither the world's model nor a diffusers pipeline folder: it has no model_index.json")
        source = str(index)
        try:
            return json.loads(index.read_text()), source
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{index} cannot be read as JSON ({e})") from None
    if path.exists():
        raise CheckpointError(f"model {str(folder_or_id)!r} is a file, not a model folder (give a diffusers pipeline folder or a hub id)")
    if not _HUB_ID.fullmatch(str(folder_or_id)):
        raise CheckpointError(f"model folder {str(folder_or_id)!r} does not exist")
    # diffusers' pipeline module imports transformers' models (seconds): loaded only for a hub id
    from diffusers import DiffusionPipeline

    try:  # a hub id: diffusers fetches model_index.json (or finds it in its cache)
        return dict(DiffusionPipeline.load_config(str(folder_or_id))), f"{folder_or_id}/model_index.json"
    except Exception as e:  # offline, unknown id, no access: every way ends in one line naming the id and the cause
        root = e
        while root.__cause__ is not None or root.__context__ is not None:  # the first cause says why (offline, DNS …)
            root = root.__cause__ or root.__context__
        reason = (str(root).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"model {str(folder_or_id)!r} is no local folder, and as a hub id it cannot be reached "
                              f"({type(root).__name__}: {reason})") from None


def load_backbone(folder_or_id: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Backbone:
    """The backbone in ``folder_or_id`` (a local folder or a hub id; ``None``: the shipped world model), of the class
    its ``model_index.json`` names, on ``device`` in ``dtype``."""
    if folder_or_id is None or str(folder_or_id) == "":
        return WorldBackbone.from_pretrained(None, device=device, dtype=dtype)
    index, source = _model_index(str(folder_or_id))
    cls = backbone_class(str(index.get("_class_name")), source)
    return cls.from_pretrained(folder_or_id, device=device, dtype=dtype)


__all__ = ["BACKBONES", "Backbone", "ComponentLoRA", "Conditioning", "StableDiffusionBackbone", "StableDiffusionXLBackbone", "WorldBackbone", "as_components",
           "backbone_class", "load_backbone"]
