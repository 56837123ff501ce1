"""The released HyperLoRA SDXL models (ByteDance, ``bytedance-research/HyperLoRA`` on the Hugging Face hub, used by
the ComfyUI-HyperLoRA nodes) imported into hyperbooth as a personalizer (method ``hyperlora-released``).

Why a class of its own and not options of :class:`~hyperbooth.methods.hyperlora.HyperLoRA`: the released
resampler differs in nearly every part — an input projection per condition, attention whose inner width
(heads x dim_head = 768) differs from the model width (1024) and has no biases, a LayerNorm on the attended tokens,
no final LayerNorm, 8 latents per attention module, an ID projector ending in a LayerNorm, and several references
averaged *before* the L2 normalisation instead of after it. Options for all of that would have touched every line of
the trained class; this module reuses its conventions (:func:`~hyperbooth.methods.hyperlora.mix_basis`, rows
``2j``/``2j + 1`` = target j's A and B, ``alpha = rank / 2``) and leaves it and its checkpoints untouched.

The released layout (read from the loader of the official ComfyUI nodes, ``hyperlora/nodes.py``,
``hyperlora/modules.py``, ``hyperlora/configs.py``, ``hyperlora/common.py`` of ComfyUI-HyperLoRA, GPL-3.0; facts
only, no code taken). A model folder (``sdxl_hyper_id_lora_v1_fidelity`` or ``sdxl_hyper_id_lora_v1_edit``) holds:

=================================================  ========================  =============================================
key                                                shape (released SDXL)     meaning
=================================================  ========================  =============================================
**hyper_lora_modules.json**                        M = 140 entries           attention module name → ``{"hidden_size": h,
                                                                             "cross_attention_dim": c or null}``, in the
                                                                             order of the latents and of the bases
**resampler.safetensors** (ID-LoRA perceiver)
``latents``                                        (1, 8M = 1120, 1024)      learned queries, 8 per attention module
``proj_in.weight`` / ``.bias``                     (1024, 1024) / (1024,)    condition x (ArcFace ID tokens) → dim
``proj_in_2.weight`` / ``.bias``                   (1024, 1024) / (1024,)    condition y (CLIP tokens) → dim
``proj_out.weight`` / ``.bias``                    (128, 1024) / (128,)      latent → K = 128 coefficients
``layers.{j}.norm_attn1.weight|bias``              (1024,)                   j = 0..3 (depth 4); LayerNorm eps 1e-5
``layers.{j}.norm_attn2_l|norm_attn2_x.*``         (1024,)                   norms of latents / of x
``layers.{j}.norm_attn3_l|norm_attn3_y.*``         (1024,)                   norms of latents / of y
``layers.{j}.norm_ff.weight|bias``                 (1024,)
``layers.{j}.attn{1,2,3}.to_q|to_k|to_v.weight``   (768, 1024)               12 heads x 64, no bias
``layers.{j}.attn{1,2,3}.to_out.0.weight``         (1024, 768)               no bias
``layers.{j}.ff.net.0.proj.weight|bias``           (4096, 1024) / (4096,)    GELU (exact) feed-forward, mult 4
``layers.{j}.ff.net.2.weight|bias``                (1024, 4096) / (1024,)
**id_projector.safetensors**
``0.weight`` / ``0.bias``                          (16384, 512) / (16384,)   ArcFace 512-d → 16 tokens x 1024
``2.weight`` / ``2.bias``                          (1024,)                   LayerNorm over each token
**hyper_lora_modules.safetensors** (the bases)
``{i}.{p}.id_down_basis``                          (128, d_in, 8)            i = 0..M-1, p in to_q, to_k, to_v, to_out
``{i}.{p}.id_up_basis``                            (128, 8, d_out)
``{i}.{p}.base_down_basis`` / ``base_up_basis``    (128, d_in, 4) / (128, 4, d_out)   only with a Base-LoRA
**base_resampler.safetensors** (optional)          as resampler, without     Base-LoRA perceiver (one condition: CLIP)
                                                   ``proj_in_2``/``attn3``
=================================================  ========================  =============================================

Hyperparameters (the nodes' "Uni" loader, the released models' setting): resampler dim 1024, depth 4, heads 12,
dim_head 64, ff_mult 4; ``encoder_types = clip + arcface``; ``id_embed_dim`` 512; ``num_id_tokens`` 16;
``hyper_dim`` (K, the basis size) 128; ``lora_rank`` 8; ``has_base_lora`` false (the README: the 0.25x Base-LoRA
was distilled into the ID-LoRA, so the v1 models ship no Base-LoRA). Image encoder: CLIP ViT-L/14
(``openai/clip-vit-large-patch14``, hidden 1024, 257 tokens at 224 px), its *penultimate* hidden state
(``hidden_states[-2]``), CLIP's image processor. Face encoder: InsightFace AntelopeV2 (glintr100 ArcFace),
``normed_embedding`` (512-d, unit norm) of the first detected face. Files are float16.

Targets: every attention projection of SDXL's UNet, ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and
``attn2`` of the 70 transformer blocks (down 2+2+10+10, mid 10, up 3x10 + 3x2): M = 140 modules, 560 LoRA layers.
d_in/d_out: h = 640 (down_blocks.1, up_blocks.1) or 1280 (down_blocks.2, mid, up_blocks.0); ``attn2.to_k``/``to_v``
read c = 2048.

The formula (per subject, references r = 1..k)::

    ids_r   = LayerNorm(reshape(W0 · arcface_r + b0, (16, 1024)))            # the ID projector
    lat_r   = latents;  for each block: lat += attn1(n(lat), n(lat));
              lat += attn2(n(lat), n(proj_in(ids_r)));  lat += attn3(n(lat), n(proj_in_2(clip_r)));  lat += ff(n(lat))
    o       = mean_r proj_out(lat_r)                         # (8M, K): the average over references, before ...
    c       = o / sqrt(Σ_K o² + 1e-8)                        # ... the L2 normalisation
    module i, projection p (q, k, v, out = 0..3):  c_down = c[8i + 2p], c_up = c[8i + 2p + 1]
    lora_down = (Σ_k c_down[k] · id_down_basis[k])ᵀ  (r, d_in);  lora_up = (Σ_k c_up[k] · id_up_basis[k])ᵀ  (d_out, r)
    alpha = r / 2 (kohya): ΔW = 0.5 · up · down; the LoRA is then applied at the user's strength (README: 0.75-0.85)

The face encoder: where AntelopeV2 is not installed (it is not here, and hyperbooth cannot download it), the ID
path is *skipped*, with a warning: the resampler's ID cross-attention (``attn2``) is left out of every block and the
coefficients come from the CLIP tokens alone — a model the released one was never trained as, so identity is weaker
than in ComfyUI. dlib's 128-d face descriptor is not offered in its place: it is another network's embedding space,
and the ID projector's first layer was trained on ArcFace's unit 512-d vectors; any map between the two (padding, a
random or fitted projection) would feed tokens the resampler has never seen. Precomputed ArcFace embeddings can be
passed (``coefficients(..., id_embeds=)``), and ``face_encoder="insightface"`` runs AntelopeV2 where insightface and
its model files are installed.

Not reproduced: the nodes' face preprocessing (106-point landmarks, the face masked onto grey, a crop of 1.5x the
landmarks' extent). hyperbooth reads the references as given (``crop = 1``: pass face crops) or the subject boxes
given to :meth:`ReleasedHyperLoRA.coefficients`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.encoders import VisionTransformersEncoder, encode_images
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.faces import NoFaceError, to_uint8
from hyperbooth.lora.io import PICKLE_SUFFIXES
from hyperbooth.lora.weights import LoRALayer, LoRAWeights, combine
from hyperbooth.methods.base import Personalizer, register
from hyperbooth.methods.hyperlora import mix_basis, subject_views

log = logging.getLogger(__name__)

#: the files of a released model folder
MODULES_JSON = "hyper_lora_modules.json"
MODULES_FILE = "hyper_lora_modules.safetensors"
RESAMPLER_FILE = "resampler.safetensors"
BASE_RESAMPLER_FILE = "base_resampler.safetensors"
ID_PROJECTOR_FILE = "id_projector.safetensors"
#: the projections of one attention module, in the order of its 8 latents (down, up each)
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
#: OpenAI CLIP's image normalisation (the released pipeline's CLIPImageProcessor)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FACE_ENCODERS = ("none", "insightface")

NO_ID_WARNING = (
    "released HyperLoRA: no ArcFace face embedding (face_encoder='none'; InsightFace AntelopeV2 is not installed or not "
    "asked for), so its ID path is skipped: the ID cross-attention of every resampler block is left out and the LoRA "
    "comes from the CLIP tokens alone, which the released model was not trained for (weaker identity than in ComfyUI). "
    "dlib's 128-d descriptor is another embedding space and is not used in its place; pass ArcFace embeddings "
    "(id_embeds=) or install insightface with antelopev2 and use face_encoder='insightface'."
)


@dataclass
class ReleasedHyperLoRAConfig:
    """The released models' hyperparameters (defaults: the SDXL v1 models); the importer reads them off the files."""

    dim: int = 1024  # resampler width
    depth: int = 4  # resampler blocks
    heads: int = 12
    dim_head: int = 64  # attention inner width = heads x dim_head (768)
    ff_mult: int = 4
    embedding_dim: int = 1024  # image-encoder token size (CLIP ViT-L/14: 1024); also the ID tokens' size
    num_basis: int = 128  # K ("hyper_dim")
    rank: int = 8  # ID-LoRA rank; a Base-LoRA has rank // 2
    id_path: bool = True  # encoder_types "clip + arcface" (two conditions); false: "clip" alone
    id_embed_dim: int = 512  # ArcFace
    num_id_tokens: int = 16
    base_lora: bool = False  # the v1 models ship none
    base_lora_scale: float = 0.25
    encoder: str = ""  # the CLIP vision model folder (or hub id already cached); "" → none (tokens must be given)
    encoder_layer: int = -2  # which hidden state of the image encoder (the penultimate one)
    face_encoder: str = "none"  # "none" (ID path skipped, with a warning) | "insightface" | "insightface:<root>"
    crop: float = 1.0  # without boxes: the centred square of this side is the ID image (1: the reference as given)
    targets: tuple[str, ...] = ()  # UNet target patterns; empty: the backbone's default (all attention projections)
    source: str = ""  # the released folder this was imported from (a record)

    #: the fields that may change after import (``with_options``, ``--base-lora-scale``)
    INFERENCE_OPTIONS: ClassVar[tuple[str, ...]] = ("base_lora_scale", "face_encoder")

    def validate(self) -> None:
        for key in ("dim", "depth", "heads", "dim_head", "ff_mult", "embedding_dim", "num_basis", "rank", "id_embed_dim", "num_id_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hypernet.{key}={value!r} must be a positive integer")
        if self.base_lora and self.rank < 2:
            raise ConfigError(f"hypernet.rank={self.rank} leaves the Base-LoRA (rank // 2) empty")
        if isinstance(self.base_lora_scale, bool) or not isinstance(self.base_lora_scale, (int, float)) or not (math.isfinite(self.base_lora_scale) and self.base_lora_scale >= 0):
            raise ConfigError(f"hypernet.base_lora_scale={self.base_lora_scale!r} must be a number >= 0")
        if not (isinstance(self.crop, (int, float)) and 0 < self.crop <= 1):
            raise ConfigError(f"hypernet.crop={self.crop!r} must be in (0, 1]")
        face_encoder_kind(self.face_encoder)


def face_encoder_kind(spec: str) -> str:
    """``"none"`` | ``"insightface"`` | ``"insightface:<root>"`` → its kind; dlib and anything else refused, named."""
    kind = str(spec).split(":", 1)[0]
    if kind == "dlib":
        raise ConfigError("face_encoder='dlib': dlib's 128-d face descriptor cannot stand in for the 512-d ArcFace (AntelopeV2) "
                          "embedding the released ID projector was trained on (another network, another space); use 'none' "
                          "(the ID path is skipped) or 'insightface'")
    if kind not in FACE_ENCODERS:
        raise ConfigError(f"face_encoder={spec!r} must be one of {', '.join(FACE_ENCODERS)} (or insightface:<models root>)")
    return kind


# -- the networks (the released layout's parameter names, so that import is a prefix and a shape check) -----------


class _Attention(nn.Module):
    """Multi-head attention of inner width ``heads * dim_head`` (may differ from ``dim``), no biases:
    ``to_out(softmax(q kᵀ / sqrt(dim_head)) v)``."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))  # (B, h, T, d)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class _GELUProjection(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # the exact (erf) GELU


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])  # index 1: the released dropout slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _PerceiverBlock(nn.Module):
    """Self-attention over the latents; cross-attention to condition x (``attn2``) and to condition y (``attn3``),
    each with its own LayerNorms of latents and condition; feed-forward. Pre-norm, residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, two_conditions: bool):
        super().__init__()
        self.norm_attn1, self.attn1 = nn.LayerNorm(dim), _Attention(dim, heads, dim_head)
        self.norm_attn2_l, self.norm_attn2_x, self.attn2 = nn.LayerNorm(dim), nn.LayerNorm(dim), _Attention(dim, heads, dim_head)
        if two_conditions:
            self.norm_attn3_l, self.norm_attn3_y, self.attn3 = nn.LayerNorm(dim), nn.LayerNorm(dim), _Attention(dim, heads, dim_head)
        self.norm_ff, self.ff = nn.LayerNorm(dim), _FeedForward(dim, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_attn1(latents)
        latents = latents + self.attn1(h, h)
        if x is not None:
            latents = latents + self.attn2(self.norm_attn2_l(latents), self.norm_attn2_x(x))
        if y is not None:
            latents = latents + self.attn3(self.norm_attn3_l(latents), self.norm_attn3_y(y))
        return latents + self.ff(self.norm_ff(latents))


class ReleasedResampler(nn.Module):
    """``(B, Tx, E)`` condition x and optional ``(B, Ty, E)`` condition y → ``(B, Q, K)`` coefficients *before* the
    L2 normalisation (the released model averages references first; see :func:`normalise`)."""

    def __init__(self, num_queries: int, cfg: ReleasedHyperLoRAConfig, two_conditions: bool):
        super().__init__()
        self.two_conditions = two_conditions
        self.latents = nn.Parameter(torch.randn(1, num_queries, cfg.dim) / math.sqrt(cfg.dim))
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        if two_conditions:
            self.proj_in_2 = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.num_basis)
        self.layers = nn.ModuleList(_PerceiverBlock(cfg.dim, cfg.heads, cfg.dim_head, cfg.ff_mult, two_conditions) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor | None, y: torch.Tensor | None = None) -> torch.Tensor:
        if x is None and y is None:
            raise ConfigError("the resampler needs at least one condition")
        if y is not None and not self.two_conditions:
            raise ConfigError("this resampler reads one condition")
        batch = (x if x is not None else y).shape[0]
        latents = self.latents.expand(batch, -1, -1)
        x = None if x is None else self.proj_in(x)
        y = None if y is None else self.proj_in_2(y)
        for layer in self.layers:
            latents = layer(latents, x, y)
        return self.proj_out(latents)


def normalise(o: torch.Tensor) -> torch.Tensor:
    """The released output normalisation: ``o / sqrt(Σ o² + 1e-8)`` over the last axis."""
    return o * (o.pow(2).sum(dim=-1, keepdim=True) + 1e-8).rsqrt()


class _LayerBasis(nn.Module):
    """One projection's bases: ``id_down_basis (K, d_in, r)``, ``id_up_basis (K, r, d_out)`` (+ the Base-LoRA's at
    rank r // 2). Uninitialised: they are always loaded."""

    def __init__(self, k: int, d_in: int, d_out: int, rank: int, base: bool):
        super().__init__()
        self.id_down_basis = nn.Parameter(torch.empty(k, d_in, rank))
        self.id_up_basis = nn.Parameter(torch.empty(k, rank, d_out))
        if base:
            self.base_down_basis = nn.Parameter(torch.empty(k, d_in, rank // 2))
            self.base_up_basis = nn.Parameter(torch.empty(k, rank // 2, d_out))


class _ModuleBasis(nn.Module):
    def __init__(self, k: int, shapes: list[tuple[int, int]], rank: int, base: bool):
        super().__init__()
        for proj, (d_in, d_out) in zip(PROJECTIONS, shapes):
            setattr(self, proj, _LayerBasis(k, d_in, d_out, rank, base))


def group_targets(target_shapes: dict[str, tuple[int, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Target names in groups of four (``<module>.to_q, .to_k, .to_v, .to_out.0``) → ``[(module, shapes)]``; anything
    else is named."""
    names = list(target_shapes)
    if len(names) % 4:
        raise ConfigError(f"the released HyperLoRA emits 4 projections per attention module; got {len(names)} targets")
    groups = []
    for i in range(0, len(names), 4):
        prefix = names[i].rsplit(".", 1)[0]
        want = [f"{prefix}.{s}" for s in TARGET_SUFFIXES]
        if names[i:i + 4] != want:
            raise ConfigError(f"targets {names[i:i + 4]} are not {want} (the released order: to_q, to_k, to_v, to_out.0 per module)")
        groups.append((prefix, [target_shapes[n] for n in want]))
    return groups


# -- the personalizer ---------------------------------------------------------------------------------------------


class _CLIPPenultimate(VisionTransformersEncoder):
    """A CLIP vision model's hidden state ``layer`` (the released: -2, before the post-LayerNorm), with OpenAI CLIP's
    normalisation (the released pipeline's image processor, also where the folder has no processor config)."""

    def __init__(self, path: str | os.PathLike, layer: int = -2):
        super().__init__(path)
        self.layer = layer
        self.mean.copy_(torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return self.model(pixel_values=x, output_hidden_states=True).hidden_states[self.layer]  # (B, T, D)


class _InsightFaceArcFace:
    """AntelopeV2's ArcFace through insightface (when installed): images in [-1, 1] → ``(B, 512)`` unit embeddings
    of the largest detected face. Not a module: nothing of it is saved."""

    def __init__(self, root: str | None):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise ConfigError("face_encoder='insightface' needs the insightface package and the antelopev2 model files "
                              "(not installed here); use face_encoder='none' to skip the ID path") from None
        try:  # missing model files end in an assertion or a download attempt inside insightface: one clear error
            self.app = FaceAnalysis(name="antelopev2", root=root or "~/.insightface", providers=["CPUExecutionProvider"])
            self.app.prepare(ctx_id=0, det_size=(640, 640))
        except Exception as e:
            raise CheckpointError(f"insightface's antelopev2 models cannot be loaded from {root or '~/.insightface'!r} "
                                  f"({type(e).__name__}: {e}); put the antelopev2 folder under <root>/models/") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np

        out = []
        for i, rgb in enumerate(to_uint8(images)):
            faces = self.app.get(np.ascontiguousarray(rgb[..., ::-1]))  # BGR
            if not faces:
                raise NoFaceError(f"reference image {i}: no face detected (the released HyperLoRA's ID path needs one)", index=i)
            face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            out.append(torch.from_numpy(np.asarray(face.normed_embedding, dtype=np.float32)))
        return torch.stack(out).to(images.device)


@register
class ReleasedHyperLoRA(Personalizer):
    """The released HyperLoRA (inference only): references ``(N, k, 3, H, W)`` → ID-LoRA (+ ``base_lora_scale`` x
    Base-LoRA where the model has one) as :class:`LoRAWeights`, rank r, ``alpha = r / 2``."""

    method = "hyperlora-released"
    config_class = ReleasedHyperLoRAConfig
    trainable = False

    def __init__(self, config: ReleasedHyperLoRAConfig, target_shapes: dict[str, tuple[int, int]]):
        super().__init__(config, target_shapes)
        cfg = config
        self.names = list(self.target_shapes)
        groups = group_targets(self.target_shapes)
        num_queries = 8 * len(groups)
        if cfg.encoder:
            self.encoder = _CLIPPenultimate(cfg.encoder, cfg.encoder_layer)
            if self.encoder.out_dim != cfg.embedding_dim:
                raise ConfigError(f"image encoder {cfg.encoder!r} gives {self.encoder.out_dim}-d tokens; this HyperLoRA reads "
                                  f"{cfg.embedding_dim}-d ones (the released models: CLIP ViT-L/14, 1024)")
        self.resampler = ReleasedResampler(num_queries, cfg, two_conditions=cfg.id_path)
        if cfg.id_path:  # ArcFace → num_id_tokens tokens of the resampler's input size
            self.id_projector = nn.Sequential(nn.Linear(cfg.id_embed_dim, cfg.num_id_tokens * cfg.embedding_dim),
                                              nn.Unflatten(-1, (cfg.num_id_tokens, cfg.embedding_dim)), nn.LayerNorm(cfg.embedding_dim))
        if cfg.base_lora:
            self.base_resampler = ReleasedResampler(num_queries, cfg, two_conditions=False)
        self.hyper_lora_modules = nn.ModuleList(_ModuleBasis(cfg.num_basis, shapes, cfg.rank, cfg.base_lora) for _, shapes in groups)
        self.requires_grad_(False)
        self._face = None
        self._warned = False

    # -- inputs -------------------------------------------------------------------------------------------------

    def _face_encoder(self):
        kind = face_encoder_kind(self.config.face_encoder)
        if kind == "none":
            return None
        spec = self.config.face_encoder
        if self._face is None or self._face[0] != spec:  # built once per setting (``with_options`` may change it)
            self._face = (spec, _InsightFaceArcFace(spec.split(":", 1)[1] if ":" in spec else None))
        return self._face[1]

    def _warn_no_id(self) -> None:
        if not self._warned:
            log.warning(NO_ID_WARNING)
            self._warned = True

    # -- forward ------------------------------------------------------------------------------------------------

    def coefficients_from_tokens(self, tokens: torch.Tensor, id_embeds: torch.Tensor | None = None,
                                 base_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Image-encoder tokens ``(N, k, T, E)`` (+ ArcFace ``id_embeds (N, k, 512)``, + the Base-LoRA's image tokens)
        → ``{"id": (N, 8M, K)[, "base": …]}``: the mean over the k references of the resampler's output, then the
        L2 normalisation (the released order). Without ``id_embeds`` a two-condition model skips its ID path."""
        n, k = tokens.shape[:2]
        flat = tokens.flatten(0, 1)
        if not self.config.id_path:
            out = self.resampler(flat)
        else:
            ids = None
            if id_embeds is not None:
                if tuple(id_embeds.shape) != (n, k, self.config.id_embed_dim):
                    raise ConfigError(f"id_embeds must be (N, k, {self.config.id_embed_dim}) = {(n, k, self.config.id_embed_dim)}, got {tuple(id_embeds.shape)}")
                ids = self.id_projector(id_embeds.flatten(0, 1).to(flat))
            else:
                self._warn_no_id()
            out = self.resampler(ids, flat)
        coeffs = {"id": normalise(out.unflatten(0, (n, k)).mean(dim=1))}
        if self.config.base_lora and base_tokens is not None:
            coeffs["base"] = normalise(self.base_resampler(base_tokens.flatten(0, 1)).unflatten(0, (n, k)).mean(dim=1))
        return coeffs

    def coefficients(self, references: torch.Tensor, boxes: torch.Tensor | None = None,
                     id_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """references ``(N, k, 3, H, W)`` in [-1, 1] → coefficients (see :meth:`coefficients_from_tokens`). The ID
        image is the subject box (``boxes (N, k, 4)``; default the centred square of side ``crop``); the Base-LoRA
        reads the image with the box removed when boxes are given, the reference as it is otherwise."""
        if references.ndim == 4:
            references = references[:, None]
        if references.ndim != 5 or references.shape[2] != 3:
            raise ConfigError(f"references must be (N, k, 3, H, W) images, got shape {tuple(references.shape)}")
        if getattr(self, "encoder", None) is None:
            raise ConfigError("this released HyperLoRA has no image encoder: import it with image_encoder=<CLIP ViT-L/14 folder> "
                              "(hyperbooth import-hyperlora --image-encoder)")
        n, k = references.shape[:2]
        flat = references.flatten(0, 1)
        flat_boxes = None if boxes is None else torch.as_tensor(boxes).flatten(0, 1)
        crops, removed = subject_views(flat, flat_boxes, self.config.crop)
        tokens = encode_images(self.encoder, crops).unflatten(0, (n, k))
        if id_embeds is None and self.config.id_path:
            face = self._face_encoder()
            if face is not None:
                id_embeds = face(flat).unflatten(0, (n, k))
        base_tokens = None
        if self.config.base_lora:
            base_tokens = encode_images(self.encoder, removed if boxes is not None else flat).unflatten(0, (n, k))
        return self.coefficients_from_tokens(tokens, id_embeds, base_tokens)

    def _lora(self, coeff: torch.Tensor, which: str, rank: int) -> LoRAWeights:
        layers = {}
        for j, name in enumerate(self.names):
            basis = getattr(self.hyper_lora_modules[j // 4], PROJECTIONS[j % 4])
            down, up = getattr(basis, f"{which}_down_basis"), getattr(basis, f"{which}_up_basis")
            layers[name] = mix_basis(coeff[:, 2 * j], coeff[:, 2 * j + 1], down, up, rank / 2)  # the released kohya alpha
        return LoRAWeights(layers)

    def id_lora(self, coeffs: dict[str, torch.Tensor]) -> LoRAWeights:
        return self._lora(coeffs["id"], "id", self.config.rank)

    def base_lora(self, coeffs: dict[str, torch.Tensor]) -> LoRAWeights:
        if "base" not in coeffs:
            raise ConfigError("this released HyperLoRA has no Base-LoRA (the v1 models distilled it into the ID-LoRA)")
        return self._lora(coeffs["base"], "base", self.config.rank // 2)

    def weights(self, coeffs: dict[str, torch.Tensor], base_scale: float | None = None) -> LoRAWeights:
        """The ID-LoRA, plus ``base_scale`` x the Base-LoRA where there is one (one LoRA of rank r + r/2, exact,
        stored with alpha = rank / 2)."""
        scale = self.config.base_lora_scale if base_scale is None else base_scale
        ident = self.id_lora(coeffs)
        if scale <= 0 or "base" not in coeffs:
            return ident
        both = combine([ident, self.base_lora(coeffs)], [1.0, float(scale)])
        return both.map(lambda l: LoRALayer(l.A, l.B * 2.0, l.rank / 2))

    def forward(self, references: torch.Tensor, boxes: torch.Tensor | None = None, id_embeds: torch.Tensor | None = None) -> LoRAWeights:
        return self.weights(self.coefficients(references, boxes, id_embeds))

    @torch.no_grad()
    def interpolate(self, refs_a: torch.Tensor, refs_b: torch.Tensor, t: float) -> LoRAWeights:
        """The LoRA at ``t`` between two subjects (``(k, 3, H, W)`` each), mixing their normalised coefficients."""
        a, b = self.coefficients(refs_a[None]), self.coefficients(refs_b[None])
        return self.weights({key: (1 - float(t)) * a[key] + float(t) * b[key] for key in a})


# -- module names ---------------------------------------------------------------------------------------------------

_DIFFUSERS = re.compile(r"(down|up)_blocks_(\d+)_attentions_(\d+)_transformer_blocks_(\d+)_(attn\d)")
_DIFFUSERS_MID = re.compile(r"mid_block_attentions_(\d+)_transformer_blocks_(\d+)_(attn\d)")
_LDM = re.compile(r"(input|output)_blocks_(\d+)_1_transformer_blocks_(\d+)_(attn\d)")
_LDM_MID = re.compile(r"middle_block_1_transformer_blocks_(\d+)_(attn\d)")


def diffusers_module_name(name: str, layers_per_block: int = 2) -> str:
    """A released module name → the diffusers UNet module (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``).

    Accepted: the diffusers name itself; kohya's flattening of it (``lora_unet_down_blocks_1_attentions_0_…``); the
    LDM/SGM one ComfyUI uses (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1``: input block i is down block
    ``(i - 1) // (L + 1)``, attention ``(i - 1) % (L + 1)``; output block j is up block ``j // (L + 1)``, attention
    ``j % (L + 1)``; L = layers per block, 2 in SD 1.x/2.x and SDXL)."""
    bare = name
    for prefix in ("lora_unet_", "unet.", "diffusion_model.", "diffusion_model_"):
        if bare.startswith(prefix):
            bare = bare[len(prefix):]
    if "." in bare:
        return bare
    if m := _DIFFUSERS.fullmatch(bare):
        return f"{m[1]}_blocks.{m[2]}.attentions.{m[3]}.transformer_blocks.{m[4]}.{m[5]}"
    if m := _DIFFUSERS_MID.fullmatch(bare):
        return f"mid_block.attentions.{m[1]}.transformer_blocks.{m[2]}.{m[3]}"
    if m := _LDM_MID.fullmatch(bare):
        return f"mid_block.attentions.0.transformer_blocks.{m[1]}.{m[2]}"
    if m := _LDM.fullmatch(bare):
        i, per = int(m[2]), layers_per_block + 1
        if m[1] == "input":
            if i < 1 or (i - 1) % per >= layers_per_block:
                raise CheckpointError(f"module {name!r}: input block {i} holds no attention (layers_per_block={layers_per_block})")
            return f"down_blocks.{(i - 1) // per}.attentions.{(i - 1) % per}.transformer_blocks.{m[3]}.{m[4]}"
        return f"up_blocks.{i // per}.attentions.{i % per}.transformer_blocks.{m[3]}.{m[4]}"
    raise CheckpointError(f"module {name!r} in {MODULES_JSON} is not a UNet attention module name hyperbooth can map "
                          "(diffusers, kohya or LDM naming)")


# -- files -----------------------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a pickle, a missing or a damaged file is named (:class:`CheckpointError`)."""
    from safetensors import safe_open

    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob(path.stem + ".*") if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (there is {pickles[0]}: a pickle, which hyperbooth refuses to load because it can run code)" if pickles else ""
        raise CheckpointError(f"{path}: no such file{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        with open(path, "rb") as f:  # only a file safetensors cannot read is sniffed (a valid header may start alike)
            head = f.read(9)
        if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
            raise CheckpointError(f"{path}: a pickle/zip (torch.save) file under a .safetensors name; hyperbooth refuses pickles "
                                  "because they can run code") from None
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_modules_json(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a released HyperLoRA folder holds {MODULES_JSON}, {MODULES_FILE}, {RESAMPLER_FILE} …)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(info, dict) or not info:
        raise CheckpointError(f"{path} must map module names to {{hidden_size, cross_attention_dim}}")
    for name, entry in info.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("hidden_size"), int) and (entry.get("cross_attention_dim") is None or isinstance(entry.get("cross_attention_dim"), int))
        if not ok:
            raise CheckpointError(f"{path}: entry {name!r} must be {{\"hidden_size\": int, \"cross_attention_dim\": int or null}}, got {entry!r}")
    return info


def _infer(cfg: ReleasedHyperLoRAConfig, resampler: dict, id_projector: dict | None, modules: dict, fixed: set[str]) -> ReleasedHyperLoRAConfig:
    """The hyperparameters the files' shapes fix (those not in ``fixed``, which the caller set); every key's shape is
    checked against the model built from them afterwards."""
    found = {}
    if (t := resampler.get("latents")) is not None and t.ndim == 3:
        found["dim"] = t.shape[2]
    if (t := resampler.get("proj_in.weight")) is not None and t.ndim == 2:
        found["embedding_dim"] = t.shape[1]
    if (t := resampler.get("proj_out.weight")) is not None and t.ndim == 2:
        found["num_basis"] = t.shape[0]
    if (t := resampler.get("layers.0.ff.net.0.proj.weight")) is not None and t.ndim == 2 and t.shape[1] and t.shape[0] % t.shape[1] == 0:
        found["ff_mult"] = t.shape[0] // t.shape[1]
    depth = 1 + max((int(k.split(".")[1]) for k in resampler if re.match(r"layers\.\d+\.", k)), default=-1)
    if depth:
        found["depth"] = depth
    found["id_path"] = "proj_in_2.weight" in resampler
    if (t := resampler.get("layers.0.attn1.to_q.weight")) is not None and t.ndim == 2:
        heads = cfg.heads
        if t.shape[0] % heads:
            raise CheckpointError(f"{RESAMPLER_FILE}: attention width {t.shape[0]} is not a multiple of heads={heads}; pass heads=")
        found["dim_head"] = t.shape[0] // heads
    if (t := modules.get("0.to_q.id_down_basis")) is not None and t.ndim == 3:
        found["rank"] = t.shape[2]
    found["base_lora"] = any(k.endswith(".base_down_basis") for k in modules)
    if id_projector is not None and (t := id_projector.get("0.weight")) is not None and t.ndim == 2:
        found["id_embed_dim"] = t.shape[1]
        e = found.get("embedding_dim", cfg.embedding_dim)
        if t.shape[0] % e == 0:
            found["num_id_tokens"] = t.shape[0] // e
    return replace(cfg, **{k: v for k, v in found.items() if k not in fixed})


def _check_and_load(model: ReleasedHyperLoRA, files: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> None:
    """Each file's keys against the model's (prefix → file): the first missing, then the first extra key, then the
    first wrong shape (both shapes) is named with its file; then the tensors are loaded."""
    expected = model.state_dict()
    for prefix, (path, tensors) in files.items():
        want = {k[len(prefix) + 1:]: v for k, v in expected.items() if k.startswith(prefix + ".")}
        missing = [k for k in want if k not in tensors]
        if missing:
            raise CheckpointError(f"{path}: key {missing[0]!r} is missing ({len(missing)} missing in all)")
        extra = [k for k in tensors if k not in want]
        if extra:
            raise CheckpointError(f"{path}: unexpected key {extra[0]!r} ({len(extra)} unexpected in all; another architecture or config?)")
        for k, v in want.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{path}: key {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    state = {f"{prefix}.{k}": v for prefix, (_, tensors) in files.items() for k, v in tensors.items()}
    model.load_state_dict({**{k: v for k, v in expected.items() if k.startswith("encoder.")}, **state}, strict=True)


def import_released_hyperlora(path: str | os.PathLike, *, image_encoder: str | os.PathLike = "", face_encoder: str = "none",
                              unet: nn.Module | None = None, layers_per_block: int = 2, **overrides) -> ReleasedHyperLoRA:
    """A released HyperLoRA folder (``hyper_lora_modules.json`` + ``.safetensors``, ``resampler.safetensors``,
    ``id_projector.safetensors``, optionally ``base_resampler.safetensors``; or any file in it) → a
    :class:`ReleasedHyperLoRA` in float32, eval mode.

    ``image_encoder``: the CLIP ViT-L/14 vision folder (needed to personalize from images; not to load).
    ``face_encoder``: ``"none"`` (the ID path is skipped, with a warning) or ``"insightface[:root]"``.
    ``unet``: a UNet to check the targets against (names and shapes). ``overrides``: config fields that the files
    cannot tell (``heads``) or that should win over what they tell. Errors name the file and the first missing,
    unexpected or mis-shaped key; pickles are refused."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: a pickle, which hyperbooth refuses to load because it can run code; the released "
                              "models are .safetensors files")
    if not path.exists():
        raise CheckpointError(f"released HyperLoRA folder {str(path)!r} does not exist")
    folder = path if path.is_dir() else path.parent
    unknown = sorted(set(overrides) - {f for f in ReleasedHyperLoRAConfig.__dataclass_fields__})
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a released-HyperLoRA setting")
    info = _read_modules_json(folder / MODULES_JSON)
    modules = _read(folder / MODULES_FILE)
    resampler = _read(folder / RESAMPLER_FILE)
    two = "proj_in_2.weight" in resampler if "id_path" not in overrides else bool(overrides["id_path"])
    id_projector = _read(folder / ID_PROJECTOR_FILE) if two else None
    base_resampler = _read(folder / BASE_RESAMPLER_FILE) if (folder / BASE_RESAMPLER_FILE).exists() or any(k.endswith(".base_down_basis") for k in modules) else None

    cfg = replace(ReleasedHyperLoRAConfig(), **overrides)
    cfg = _infer(cfg, resampler, id_projector, modules, fixed=set(overrides))
    cfg = replace(cfg, encoder=str(image_encoder) if image_encoder else "", face_encoder=face_encoder, source=str(folder.resolve()))

    shapes: dict[str, tuple[int, int]] = {}
    for name, entry in info.items():
        module = diffusers_module_name(name, layers_per_block)
        h, c = entry["hidden_size"], entry["cross_attention_dim"] or entry["hidden_size"]
        for suffix, shape in zip(TARGET_SUFFIXES, ((h, h), (c, h), (c, h), (h, h))):
            shapes[f"{module}.{suffix}"] = shape
    if len(shapes) != 4 * len(info):
        raise CheckpointError(f"{folder / MODULES_JSON}: two entries name the same UNet module")
    if unet is not None:
        from hyperbooth.lora.inject import module_shape

        named = dict(unet.named_modules())
        for target, shape in shapes.items():
            if target not in named:
                raise CheckpointError(f"{folder / MODULES_JSON}: target {target!r} is not a module of the UNet (another base model?)")
            if module_shape(target, named[target]) != shape:
                raise CheckpointError(f"{folder / MODULES_JSON}: target {target!r} is (d_in, d_out) = {shape} in the HyperLoRA "
                                      f"but {module_shape(target, named[target])} in the UNet")

    model = ReleasedHyperLoRA(cfg, shapes)
    files = {"resampler": (folder / RESAMPLER_FILE, resampler), "hyper_lora_modules": (folder / MODULES_FILE, modules)}
    if id_projector is not None:
        files["id_projector"] = (folder / ID_PROJECTOR_FILE, id_projector)
    if cfg.base_lora:
        if base_resampler is None:
            raise CheckpointError(f"{folder / BASE_RESAMPLER_FILE}: no such file, but {MODULES_FILE} holds Base-LoRA bases")
        files["base_resampler"] = (folder / BASE_RESAMPLER_FILE, base_resampler)
    _check_and_load(model, files)
    if cfg.id_path and face_encoder_kind(cfg.face_encoder) == "none":
        log.warning(NO_ID_WARNING)
        model._warned = True
    return model.float().eval()


def is_released_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` looks like a released HyperLoRA model folder (for hints)."""
    folder = Path(folder)
    return (folder / MODULES_JSON).is_file() and (folder / RESAMPLER_FILE).is_file()
