"""HyperLoRA (Li et al., "HyperLoRA: Parameter-Efficient Adaptive Generation for Portrait Synthesis", CVPR 2025):
perceiver resamplers emit coefficients over a learned basis of LoRAs, for an ID-LoRA and a Base-LoRA.

- **A low-dimensional linear LoRA space** (:func:`mix_basis`): per target layer ``K`` basis LoRAs,
  ``down_basis (K, d_in, r)`` and ``up_basis (K, r, d_out)``; a subject's LoRA is ``A = Σ_k c^A_k · down_k^T``,
  ``B = Σ_k c^B_k · up_k^T`` from L2-normalised coefficients (one vector per factor per layer). ``lora_space:
  free`` replaces the basis by a linear map from each latent to its factor: an unconstrained LoRA of the same rank,
  the reference the basis ablation measures the basis against.
- **Perceiver resampler** (:class:`Resampler`): learned latent queries, one per LoRA factor per target layer;
  blocks of self-attention over the latents, cross-attention to the ID tokens, cross-attention to the image-encoder
  tokens, feed-forward; a projection to ``K`` coefficients, L2-normalised.
- **ID projector**: an identity embedding → ``id_tokens`` tokens (``id_embedding``: the world's is the frozen
  pre-trained world encoder's pooled embedding of the subject crop, never the oracle; on face photos, ``"face"``,
  dlib's 128-d face descriptor, the stand-in for the released models' ArcFace / AntelopeV2 embedding). With
  ``subject_box: face`` the ID crop and the removed region follow dlib's face box (:mod:`hyperbooth.faces`); a
  reference in which dlib finds no face is refused at inference, named (in training it falls back to the centred
  box).
- **ID-LoRA and Base-LoRA**: two resamplers and two bases. The ID-LoRA reads the subject crop; the Base-LoRA (rank
  ``r/2``) reads the image with the subject removed (its box filled with the mean colour around it), so that what is not the subject (background, light)
  has somewhere to go in training. At inference the Base-LoRA is optional (``base_lora_scale``; the released models
  use 0.25; 0 leaves it out).
- **Several references**: the resamplers' coefficients averaged over the references (as the released code does);
  **interpolation** between subjects in coefficient space (:meth:`HyperLoRA.interpolate`).
- **Three-stage training** (``stage`` in the config, each stage continuing the previous with ``init_from``):
  (1) Base-LoRA warm-up, reconstructing the image; (2) ID-LoRA from the image-encoder tokens, each sample in one of
  three settings — ``p_reconstruct`` trigger words + Base + ID reconstructing the target, ``p_id_only`` no trigger
  words and the ID-LoRA alone held to the frozen base model's prediction, ``p_base_id`` no trigger words and
  Base + ID held to the Base-LoRA model's prediction; (3) the ID-embedding path (ID projector and the ID
  cross-attention) trained with everything else frozen, in the same three settings.

The subject box: the ID crop and the removed region are a box per reference (``boxes (N, k, 4)`` as
``x0, y0, x1, y1`` in [0, 1]); without boxes the centred square of side ``crop`` (world subjects sit near the
centre; a face box from a detector is the photo counterpart).

Exported LoRAs carry ``alpha = rank / 2``, the released models' kohya alpha.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.backbones.base import Backbone
from hyperbooth.encoders import build_encoder, encode_images
from hyperbooth.errors import ConfigError
from hyperbooth.faces import DESCRIPTOR_DIM, FaceAnalyzer, NoFaceError
from hyperbooth.lora.weights import LoRALayer, LoRAWeights, combine
from hyperbooth.methods.base import Personalizer, TrainBatch, register
from hyperbooth.prompts import RARE_TOKEN

STAGES = (1, 2, 3)
#: the ID projector's input: the frozen image encoder's pooled embedding of the subject crop (the world, any subject),
#: or dlib's 128-d face descriptor (faces; the stand-in for the ArcFace / AntelopeV2 embedding of the released models)
ID_EMBEDDINGS = ("encoder", "face")
#: where the subject is: the centred square of side ``crop``, or the face dlib finds
SUBJECT_BOXES = ("center", "face")
#: the space a subject's LoRA lives in: coefficients over a learned basis of ``num_basis`` LoRAs (the method), or
#: "free": each latent's features mapped straight to its factor (an unconstrained LoRA of the same rank; the basis
#: ablation's reference, the seed's Figure 3)
LORA_SPACES = ("basis", "free")
log = logging.getLogger(__name__)

#: the LoRA-file header entry holding a HyperLoRA subject's coefficients
COEFF_KEY = "hyperbooth.hyperlora.coefficients"

#: The HyperLoRA checkpoint trained on the world and shipped inside the package (when one is shipped).
SHIPPED_HYPERLORA = Path(__file__).resolve().parent.parent / "assets" / "world" / "hyperlora"


@dataclass
class HyperLoRAConfig:
    rank: int = 4  # ID-LoRA rank r; the Base-LoRA has max(1, r // 2)
    num_basis: int = 32  # K basis LoRAs per layer (the released SDXL models: 128); unused with lora_space "free"
    lora_space: str = "basis"  # "basis" (the method) or "free" (an unconstrained LoRA of the same rank, for the ablation)
    base_lora: bool = True  # build a Base-LoRA (stage 1 trains it)
    base_lora_scale: float = 0.25  # its scale at inference (the released models' 0.25); 0: ID-LoRA alone
    d_model: int = 256
    depth: int = 2  # resampler blocks
    heads: int = 4
    id_tokens: int = 4  # tokens the ID projector makes of the identity embedding
    encoder: str = "world-pretrained"  # image encoder (frozen pre-trained world encoder, or a transformers vision folder)
    encoder_dim: int = 128  # token size of a trainable world encoder
    targets: tuple[str, ...] = ()  # UNet module patterns; empty: the backbone's default (its attention projections)
    stage: int = 2  # 1: Base-LoRA warm-up, 2: ID-LoRA from image tokens, 3: ID-embedding fine-tune
    p_reconstruct: float = 0.90  # stages 2-3: trigger words, Base + ID, reconstruct the target
    p_id_only: float = 0.05  # no trigger words, ID-LoRA alone, held to the frozen base model
    p_base_id: float = 0.05  # no trigger words, Base + ID, held to the Base-LoRA model
    crop: float = 0.75  # the default subject box: the centred square of this side (fraction of the image)
    id_embedding: str = "encoder"  # the ID projector's input: "encoder" (the frozen image encoder's pooled embedding of the subject crop) or "face" (dlib's 128-d face descriptor)
    subject_box: str = "center"  # the ID crop and the removed region: "center" (the centred square of side crop) or "face" (dlib's face box)
    face_margin: float = 0.3  # subject_box "face": the box grown by this fraction of its size on each side (hair, chin)
    token: str = RARE_TOKEN  # the trigger word the stage-2/3 settings drop

    #: the fields that may change after training (``with_options``, ``--base-lora-scale``)
    INFERENCE_OPTIONS: ClassVar[tuple[str, ...]] = ("base_lora_scale",)

    def validate(self) -> None:
        for key in ("rank", "num_basis", "d_model", "depth", "heads", "id_tokens", "encoder_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hypernet.{key}={value!r} must be a positive integer")
        if isinstance(self.stage, bool) or self.stage not in STAGES:
            raise ConfigError(f"hypernet.stage={self.stage!r} must be 1, 2 or 3 (Base-LoRA warm-up, ID-LoRA, ID-embedding fine-tune)")
        probabilities = (self.p_reconstruct, self.p_id_only, self.p_base_id)
        if any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1 for p in probabilities) or abs(sum(probabilities) - 1) > 1e-6:
            raise ConfigError(f"hypernet.p_reconstruct, p_id_only, p_base_id = {probabilities} must be probabilities that sum to 1")
        if not isinstance(self.base_lora, bool):
            raise ConfigError(f"hypernet.base_lora={self.base_lora!r} must be true or false")
        if self.stage == 1 and not self.base_lora:
            raise ConfigError("hypernet.stage=1 trains the Base-LoRA: it needs hypernet.base_lora=true")
        if isinstance(self.base_lora_scale, bool) or not isinstance(self.base_lora_scale, (int, float)) or not (math.isfinite(self.base_lora_scale) and self.base_lora_scale >= 0):
            raise ConfigError(f"hypernet.base_lora_scale={self.base_lora_scale!r} must be a number >= 0")
        if not (isinstance(self.crop, (int, float)) and 0 < self.crop <= 1):
            raise ConfigError(f"hypernet.crop={self.crop!r} must be in (0, 1]")
        if self.d_model % self.heads:
            raise ConfigError(f"hypernet.d_model={self.d_model} must be divisible by hypernet.heads={self.heads}")
        if self.id_embedding not in ID_EMBEDDINGS:
            raise ConfigError(f"hypernet.id_embedding={self.id_embedding!r} must be one of {', '.join(map(repr, ID_EMBEDDINGS))}")
        if self.subject_box not in SUBJECT_BOXES:
            raise ConfigError(f"hypernet.subject_box={self.subject_box!r} must be one of {', '.join(map(repr, SUBJECT_BOXES))}")
        if isinstance(self.face_margin, bool) or not isinstance(self.face_margin, (int, float)) or not 0 <= self.face_margin <= 2:
            raise ConfigError(f"hypernet.face_margin={self.face_margin!r} must be a number in [0, 2]")
        if self.lora_space not in LORA_SPACES:
            raise ConfigError(f"hypernet.lora_space={self.lora_space!r} must be one of {', '.join(map(repr, LORA_SPACES))}")
        if self.encoder == "world":
            raise ConfigError("hypernet.encoder='world' is a trainable encoder; HyperLoRA reads a frozen one shared by both heads "
                              "(world-pretrained, or a CLIP / DINO / ViT folder)")

    @property
    def base_rank(self) -> int:
        return max(1, self.rank // 2)

    @property
    def coefficient_dim(self) -> int:
        """The size of one factor's coefficient vector: K over a basis, the resampler's width when free."""
        return self.num_basis if self.lora_space == "basis" else self.d_model


# -- the math -------------------------------------------------------------------------------------------------------


def mix_basis(coeff_A: torch.Tensor, coeff_B: torch.Tensor, down_basis: torch.Tensor, up_basis: torch.Tensor, alpha: float) -> LoRALayer:
    """One layer's LoRA of N subjects from its basis: ``coeff_A, coeff_B (N, K)``, ``down_basis (K, d_in, r)``,
    ``up_basis (K, r, d_out)`` → ``A = Σ_k c^A_k down_k^T (N, r, d_in)``, ``B = Σ_k c^B_k up_k^T (N, d_out, r)``."""
    if coeff_A.shape[-1] != down_basis.shape[0] or coeff_B.shape[-1] != up_basis.shape[0]:
        raise ConfigError(f"{coeff_A.shape[-1]} / {coeff_B.shape[-1]} coefficients for a basis of {down_basis.shape[0]} / {up_basis.shape[0]} LoRAs")
    A = torch.einsum("nk,kdr->nrd", coeff_A, down_basis.to(coeff_A))
    B = torch.einsum("nk,kro->nor", coeff_B, up_basis.to(coeff_B))
    return LoRALayer(A, B, alpha)


def draw_settings(u: torch.Tensor, p_reconstruct: float, p_id_only: float) -> torch.Tensor:
    """Uniform draws ``u (N,)`` → each sample's training setting: 0 reconstruct (trigger words, Base + ID), 1 ID-only
    held to the base model, 2 Base + ID held to the Base-LoRA model."""
    return (u >= p_reconstruct).long() + (u >= p_reconstruct + p_id_only).long()


def subject_views(images: torch.Tensor, boxes: torch.Tensor | None = None, crop: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """``images (B, 3, H, W)`` → ``(the subject box cropped and resized to H x W, the image with the subject removed:
    the box filled with the mean colour around it)``. ``boxes (B, 4)``: ``x0, y0, x1, y1`` in [0, 1]; default the
    centred square of side ``crop``. (A blur would keep the subject's colours, which are identity on the world.)"""
    b, _, h, w = images.shape
    if boxes is None:
        lo, hi = (1 - crop) / 2, (1 + crop) / 2
        boxes = torch.tensor([lo, lo, hi, hi]).expand(b, 4)
    boxes = torch.as_tensor(boxes, dtype=torch.float64).detach().cpu().reshape(-1, 4)
    if boxes.shape[0] != b:
        raise ConfigError(f"{boxes.shape[0]} subject boxes for {b} images")
    bad = ~(torch.isfinite(boxes).all(dim=1) & (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= 1) & (boxes[:, 3] <= 1)
            & (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3]))
    if bad.any():
        raise ConfigError(f"subject box {boxes[int(bad.nonzero()[0])].tolist()} must be x0 < x1, y0 < y1 within [0, 1]")
    crops, removed = [], []
    for i in range(b):
        x0, y0, x1, y1 = boxes[i].tolist()
        c0, r0 = min(w - 1, int(math.floor(x0 * w + 1e-6))), min(h - 1, int(math.floor(y0 * h + 1e-6)))
        c1, r1 = min(w, max(c0 + 1, int(math.ceil(x1 * w - 1e-6)))), min(h, max(r0 + 1, int(math.ceil(y1 * h - 1e-6))))
        crops.append(F.interpolate(images[i:i + 1, :, r0:r1, c0:c1], size=(h, w), mode="bilinear", align_corners=False))
        mask = torch.zeros(1, 1, h, w, device=images.device, dtype=images.dtype)
        mask[..., r0:r1, c0:c1] = 1
        outside = (1 - mask).sum()
        fill = (images[i:i + 1] * (1 - mask)).sum(dim=(2, 3), keepdim=True) / outside if outside > 0 else torch.zeros_like(images[i:i + 1, :, :1, :1])
        removed.append(images[i:i + 1] * (1 - mask) + fill * mask)
    return torch.cat(crops), torch.cat(removed)


# -- the networks -----------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, use_id: bool):
        super().__init__()
        self.norm_self, self.self_attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.use_id = use_id
        if use_id:  # its output starts at zero: turning the ID path on (stage 3) starts from the stage-2 model exactly
            self.norm_id, self.id_attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
            nn.init.zeros_(self.id_attn.out_proj.weight)
            nn.init.zeros_(self.id_attn.out_proj.bias)
        self.norm_img, self.img_attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_ff, self.ff = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, image: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        if self.use_id and ids is not None:
            x = x + self.id_attn(self.norm_id(x), ids, ids, need_weights=False)[0]
        x = x + self.img_attn(self.norm_img(x), image, image, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class Resampler(nn.Module):
    """Learned latents (one per LoRA factor per target layer) → ``(N, L, K)`` L2-normalised coefficients
    (``num_basis`` None: the latents' normalised features ``(N, L, d)``, which :class:`_FreeHeads` map to factors)."""

    def __init__(self, num_latents: int, d: int, depth: int, heads: int, num_basis: int | None, use_id: bool):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads, use_id) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, num_basis) if num_basis is not None else None

    def forward(self, image: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.latents.unsqueeze(0).expand(image.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, image, ids)
        if self.proj is None:
            return self.norm(x)
        return F.normalize(self.proj(self.norm(x)), dim=-1)


class _Basis(nn.Module):
    """Per target layer ``down (K, d_in, r)`` (random, ~1/sqrt(d_in)) and ``up (K, r, d_out)`` (zero: ΔW = 0 at init)."""

    def __init__(self, shapes: list[tuple[int, int]], num_basis: int, rank: int):
        super().__init__()
        self.down = nn.ParameterList(nn.Parameter(torch.randn(num_basis, d_in, rank) / math.sqrt(d_in)) for d_in, _ in shapes)
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(num_basis, rank, d_out)) for _, d_out in shapes)

    def layer(self, i: int, coeff_A: torch.Tensor, coeff_B: torch.Tensor, alpha: float) -> LoRALayer:
        return mix_basis(coeff_A, coeff_B, self.down[i], self.up[i], alpha)


class _FreeHeads(nn.Module):
    """``lora_space: free``: per target layer a linear map from the A latent's features to ``A (r, d_in)`` (scaled
    like the basis' random down factors) and from the B latent's to ``B (d_out, r)`` (zero: ΔW = 0 at init). Linear,
    so averaging references and interpolating subjects in feature space is the same as doing it on the factors."""

    def __init__(self, shapes: list[tuple[int, int]], d: int, rank: int):
        super().__init__()
        self.rank = rank
        self.down = nn.ModuleList(nn.Linear(d, rank * d_in) for d_in, _ in shapes)
        self.up = nn.ModuleList(nn.Linear(d, d_out * rank) for _, d_out in shapes)
        for (d_in, _), down, up in zip(shapes, self.down, self.up):
            nn.init.normal_(down.weight, std=1 / math.sqrt(d * d_in))  # unit-norm features → entries ~1/sqrt(d_in)
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def layer(self, i: int, feats_A: torch.Tensor, feats_B: torch.Tensor, alpha: float) -> LoRALayer:
        n = feats_A.shape[0]
        A = self.down[i](feats_A).view(n, self.rank, -1)
        B = self.up[i](feats_B).view(n, -1, self.rank)
        return LoRALayer(A, B, alpha)


def _lora_space(cfg: HyperLoRAConfig, shapes: list[tuple[int, int]], rank: int) -> nn.Module:
    return _Basis(shapes, cfg.num_basis, rank) if cfg.lora_space == "basis" else _FreeHeads(shapes, cfg.d_model, rank)


@register
class HyperLoRA(Personalizer):
    """references ``(N, k, 3, H, W)`` → ID-LoRA (+ ``base_lora_scale`` × Base-LoRA) as :class:`LoRAWeights`."""

    method = "hyperlora"
    config_class = HyperLoRAConfig

    def __init__(self, config: HyperLoRAConfig, target_shapes: dict[str, tuple[int, int]]):
        super().__init__(config, target_shapes)
        cfg = config
        self.names = list(self.target_shapes)
        shapes = [self.target_shapes[n] for n in self.names]
        d, n_lat = cfg.d_model, 2 * len(self.names)  # an A and a B latent per layer
        self.encoder = build_encoder(cfg.encoder, cfg.encoder_dim)
        self.id_token_proj = nn.Linear(self.encoder.out_dim, d)
        id_dim = DESCRIPTOR_DIM if cfg.id_embedding == "face" else self.encoder.out_dim
        self.id_projector = nn.Sequential(nn.Linear(id_dim, d), nn.GELU(), nn.Linear(d, cfg.id_tokens * d))
        # dlib (id_embedding or subject_box "face"), loaded with the model so a missing install is named at once; it
        # runs on the CPU for every reference (its results cached per image)
        self._faces: FaceAnalyzer | None = FaceAnalyzer() if "face" in (cfg.id_embedding, cfg.subject_box) else None
        self.faces_missing = 0  # training images in which dlib found no face (centred box, zero descriptor instead)
        k = cfg.num_basis if cfg.lora_space == "basis" else None
        self.id_resampler = Resampler(n_lat, d, cfg.depth, cfg.heads, k, use_id=True)
        self.id_basis = _lora_space(cfg, shapes, cfg.rank)
        if cfg.base_lora:
            self.base_token_proj = nn.Linear(self.encoder.out_dim, d)
            self.base_resampler = Resampler(n_lat, d, cfg.depth, cfg.heads, k, use_id=False)
            self.base_basis = _lora_space(cfg, shapes, cfg.base_rank)
        #: the last stage this model has been trained in (0: none), saved with it: a stage continues the one before
        self.register_buffer("stage_reached", torch.tensor(0, dtype=torch.long))
        self._set_stage(cfg.stage)

    # -- stages -------------------------------------------------------------------------------------------------

    def stage_parameters(self, stage: int) -> list[str]:
        """Names of the parameters stage ``stage`` trains (the frozen encoder never)."""
        names = [n for n, _ in self.named_parameters() if not n.startswith("encoder.")]
        id_attn = lambda n: ".id_attn." in n or ".norm_id." in n  # noqa: E731
        if stage == 1:
            return [n for n in names if n.startswith(("base_token_proj.", "base_resampler.", "base_basis."))]
        if stage == 2:
            return [n for n in names if n.startswith(("id_token_proj.", "id_resampler.", "id_basis.")) and not id_attn(n)]
        return [n for n in names if n.startswith("id_projector.") or id_attn(n)]

    def check_training_data(self, data_config, dataset) -> None:
        """The data's trigger word must be the one the untriggered settings drop."""
        token = getattr(data_config, "token", self.config.token)
        if self.config.stage > 1 and token != self.config.token:
            raise ConfigError(f"data.token={token!r} but hypernet.token={self.config.token!r}: settings 2 and 3 drop the trigger word, "
                              "so both must name the same one")

    def _check_stage_order(self) -> None:
        need = self.config.stage - 1 if (self.config.stage == 3 or self.config.base_lora) else 0
        if int(self.stage_reached) < need:
            raise ConfigError(f"hypernet.stage={self.config.stage} continues a stage-{need} model (init_from=<its hypernet folder>); "
                              f"this one has reached stage {int(self.stage_reached)}")

    def _set_stage(self, stage: int) -> None:
        trained = set(self.stage_parameters(stage))
        for name, p in self.named_parameters():
            if not name.startswith("encoder.") or self.encoder.trainable:
                p.requires_grad_(name in trained)

    # -- forward --------------------------------------------------------------------------------------------------

    def coefficients(self, references: torch.Tensor, boxes: torch.Tensor | None = None, use_id: bool | None = None) -> dict[str, torch.Tensor]:
        """references ``(N, k, 3, H, W)`` → ``{"id": (N, 2L, K), "base": (N, 2L, K)}``, each the mean over the k
        references of the resampler's L2-normalised coefficients (rows ``2l`` and ``2l + 1``: layer l's A and B; with
        ``lora_space: free`` K is ``d_model`` and the rows are the latents' features).
        ``use_id``: whether the ID-embedding path runs (default: in a stage-3 model, the stage that trains it)."""
        if references.ndim == 4:
            references = references[:, None]
        if references.ndim != 5 or references.shape[2] != 3:
            raise ConfigError(f"references must be (N, k, 3, H, W) images, got shape {tuple(references.shape)}")
        n, k = references.shape[:2]
        flat = references.flatten(0, 1)
        if use_id is None:
            use_id = self.config.stage == 3
        face_boxes = descriptors = None
        if (boxes is None and self.config.subject_box == "face") or (use_id and self.config.id_embedding == "face"):
            face_boxes, descriptors = self.face_views(flat)
        boxes = face_boxes if boxes is None else boxes.flatten(0, 1)
        crops, removed = subject_views(flat, boxes, self.config.crop)
        id_feats = encode_images(self.encoder, crops)  # (n·k, T, D)
        ids = None
        if use_id:
            embedding = descriptors.to(id_feats) if self.config.id_embedding == "face" else id_feats.mean(dim=1)
            ids = self.id_projector(embedding).unflatten(-1, (self.config.id_tokens, self.config.d_model))
        out = {"id": self.id_resampler(self.id_token_proj(id_feats), ids).unflatten(0, (n, k)).mean(dim=1)}
        if self.config.base_lora:
            out["base"] = self.base_resampler(self.base_token_proj(encode_images(self.encoder, removed))).unflatten(0, (n, k)).mean(dim=1)
        return out

    def face_views(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """dlib on ``images (B, 3, H, W)``: the face boxes (grown by ``face_margin``; None unless ``subject_box`` is
        "face") and the 128-d descriptors. At inference an image without a face is an error (:class:`NoFaceError`,
        its index); in training it falls back to the centred box and a zero descriptor, counted in
        ``faces_missing`` (a face data set has a few photos dlib misses; they should not stop a run)."""
        if self._faces is None:
            self._faces = FaceAnalyzer()
        found = self._faces.find(images)
        missing = [i for i, face in enumerate(found) if face is None]
        if missing and not self.training:
            raise NoFaceError(f"reference image {missing[0]}: dlib finds no face in it; HyperLoRA with "
                              f"{'id_embedding' if self.config.id_embedding == 'face' else 'subject_box'}='face' needs a "
                              "frontal face at least about 80 pixels wide", index=missing[0])
        if missing:
            if self.faces_missing == 0 or (self.faces_missing + len(missing)) // 100 > self.faces_missing // 100:
                log.warning("dlib found no face in %d training references so far (centred box, zero descriptor instead)", self.faces_missing + len(missing))
            self.faces_missing += len(missing)
        lo, hi = (1 - self.config.crop) / 2, (1 + self.config.crop) / 2
        m = float(self.config.face_margin)
        boxes, descriptors = [], []
        for face in found:
            if face is None:
                boxes.append((lo, lo, hi, hi))
                descriptors.append(torch.zeros(DESCRIPTOR_DIM))
                continue
            x0, y0, x1, y1 = face.box
            dx, dy = m * (x1 - x0), m * (y1 - y0)
            boxes.append((max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy)))
            descriptors.append(torch.from_numpy(face.descriptor))
        box_tensor = torch.tensor(boxes, dtype=torch.float32) if self.config.subject_box == "face" else None
        return box_tensor, torch.stack(descriptors)

    def _lora(self, coeff: torch.Tensor, basis: _Basis | _FreeHeads, rank: int) -> LoRAWeights:
        alpha = rank / 2  # the released models' kohya alpha
        return LoRAWeights({name: basis.layer(i, coeff[:, 2 * i], coeff[:, 2 * i + 1], alpha) for i, name in enumerate(self.names)})

    def id_lora(self, coeffs: dict[str, torch.Tensor]) -> LoRAWeights:
        return self._lora(coeffs["id"], self.id_basis, self.config.rank)

    def base_lora(self, coeffs: dict[str, torch.Tensor]) -> LoRAWeights:
        if "base" not in coeffs:
            raise ConfigError("this HyperLoRA has no Base-LoRA (hypernet.base_lora: false)")
        return self._lora(coeffs["base"], self.base_basis, self.config.base_rank)

    def weights(self, coeffs: dict[str, torch.Tensor], base_scale: float | None = None) -> LoRAWeights:
        """The subjects' LoRA from coefficients: the ID-LoRA, plus ``base_scale`` × the Base-LoRA when that is > 0
        (one LoRA of rank r + r/2, exact)."""
        scale = self.config.base_lora_scale if base_scale is None else base_scale
        ident = self.id_lora(coeffs)
        if scale <= 0 or "base" not in coeffs:
            return ident
        both = combine([ident, self.base_lora(coeffs)], [1.0, float(scale)])  # alpha = rank (scale 1) ...
        return both.map(lambda l: LoRALayer(l.A, l.B * 2.0, l.rank / 2))  # ... as alpha = rank / 2, the released files' (same ΔW)

    def forward(self, references: torch.Tensor, boxes: torch.Tensor | None = None) -> LoRAWeights:
        coeffs = self.coefficients(references, boxes)
        self._last_coefficients = {k: v.detach().float().cpu() for k, v in coeffs.items()}  # for subject_metadata
        return self.weights(coeffs)

    # -- subjects in coefficient space ------------------------------------------------------------------------

    def subject_metadata(self, index: int = 0) -> dict[str, str]:
        """The subject's coefficients for its LoRA file's header (base64 float32), so that LoRA files of this
        HyperLoRA can be mixed in its coefficient space (:meth:`mix`)."""
        import base64
        import json

        last = getattr(self, "_last_coefficients", None)
        if last is None:
            return {}
        return {COEFF_KEY: json.dumps({k: {"shape": list(v[index].shape), "data": base64.b64encode(v[index].numpy().tobytes()).decode()}
                                       for k, v in last.items()}),
                "hyperbooth.hyperlora.base_lora_scale": f"{self.config.base_lora_scale:g}"}

    def coefficients_from_metadata(self, metadata: dict[str, str], source: str = "LoRA file") -> dict[str, torch.Tensor] | None:
        """A subject's coefficients from a LoRA file's header (``(1, 2L, K)`` each), None if it has none; ones that do
        not fit this HyperLoRA are named."""
        import base64
        import json

        import numpy as np

        if COEFF_KEY not in metadata:
            return None
        try:
            stored = json.loads(metadata[COEFF_KEY])
            out = {k: torch.from_numpy(np.frombuffer(base64.b64decode(v["data"]), dtype=np.float32).copy()).reshape(v["shape"])[None]
                   for k, v in stored.items()}
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):
            raise ConfigError(f"{source}: its HyperLoRA coefficients cannot be read") from None
        want = (2 * len(self.names), self.config.coefficient_dim)
        if set(out) != ({"id", "base"} if self.config.base_lora else {"id"}) or any(tuple(v.shape[1:]) != want for v in out.values()):
            raise ConfigError(f"{source}: its HyperLoRA coefficients do not fit this HyperLoRA (another basis or targets)")
        return out

    def mix(self, coefficient_sets: list[dict[str, torch.Tensor]], weights: list[float]) -> LoRAWeights:
        """``Σ_i w_i c_i`` of several subjects' coefficients → one LoRA (interpolation: weights summing to 1)."""
        mixed = {k: sum(w * c[k] for c, w in zip(coefficient_sets, weights)) for k in coefficient_sets[0]}
        with torch.no_grad():
            device = self.id_resampler.latents.device
            return self.weights({k: v.to(device) for k, v in mixed.items()})

    @torch.no_grad()
    def interpolate(self, refs_a: torch.Tensor, refs_b: torch.Tensor, t: float) -> LoRAWeights:
        """The LoRA at ``t`` between two subjects (``(k, 3, H, W)`` each), mixing their coefficients:
        ``(1 − t) c_A + t c_B`` (in the LoRA space the bases span, not in ΔW)."""
        a, b = self.coefficients(refs_a[None]), self.coefficients(refs_b[None])
        return self.mix([a, b], [1.0 - float(t), float(t)])

    # -- training -------------------------------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 1: the Base-LoRA alone reconstructs the target. Stages 2-3: each sample in one of three settings
        (:func:`draw_settings`, from the global RNG the engine seeds per step): reconstruct with trigger words and
        Base + ID; without trigger words the ID-LoRA alone held to the frozen base model's prediction; without
        trigger words Base + ID held to the Base-LoRA model's. Min-SNR-weighted MSE throughout."""
        cfg = self.config
        self._check_stage_order()
        coeffs = self.coefficients(batch.references)
        if cfg.stage == 1:
            with backbone.apply_lora(self.base_lora(coeffs), mode="per_sample"):
                pred = backbone.denoise(batch.x_t, batch.t, batch.cond)
            loss = _mse(pred, batch.target, batch.loss_weights)
            return loss, {"reconstruct": loss}
        n = batch.x_t.shape[0]
        setting = draw_settings(torch.rand(n), cfg.p_reconstruct, cfg.p_id_only).to(batch.x_t.device)
        plain = [_drop_token(p, cfg.token) for p in batch.prompts]
        cond = batch.cond
        if (setting > 0).any():  # the prompts of settings 1-2 without their trigger words (only those are encoded again)
            changed = (setting > 0).nonzero().squeeze(1)
            again = backbone.encode_prompts([plain[int(i)] for i in changed])
            cond = batch.cond.replace_rows(changed, again)  # the pooled embeddings too (SDXL, SD3): no trigger word anywhere
        ident = self.id_lora(coeffs)
        target = batch.target
        if "base" in coeffs:
            with torch.no_grad():
                base = self.base_lora({k: v.detach() for k, v in coeffs.items()})
            keep = (setting != 1).to(base[self.names[0]].B.dtype)  # ID-only rows carry no Base-LoRA
            base = base.map(lambda l: LoRALayer(l.A, l.B * keep[:, None, None], l.alpha))
            weights = combine([ident, base], [1.0, 1.0])
        else:
            base, weights = None, ident
        if (setting > 0).any():  # the teachers, on their rows only: the frozen base model (setting 1), the Base-LoRA model (2)
            rows = (setting > 0).nonzero().squeeze(1)
            sub = cond.select(rows)
            with torch.no_grad():
                if base is not None:
                    lora_rows = torch.where(setting[rows] == 2, rows, torch.full_like(rows, -1))  # -1: no LoRA on that row
                    with backbone.apply_lora(base, mode="per_sample", rows=lora_rows):
                        teacher = backbone.denoise(batch.x_t[rows], batch.t[rows], sub)
                else:
                    teacher = backbone.denoise(batch.x_t[rows], batch.t[rows], sub)
            target = target.clone()
            target[rows] = teacher.to(target.dtype)
        with backbone.apply_lora(weights, mode="per_sample"):
            pred = backbone.denoise(batch.x_t, batch.t, cond)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1) * batch.loss_weights
        loss = per_sample.mean()
        scalars = {"reconstruct": _masked_mean(per_sample, setting == 0), "id_only": _masked_mean(per_sample, setting == 1),
                   "base_id": _masked_mean(per_sample, setting == 2)}
        return loss, scalars

    # -- files ------------------------------------------------------------------------------------------------

    def state_to_save(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if self.training:  # saved by a training run (checkpoints, the final folder): it has now trained this stage
            self.stage_reached.fill_(max(int(self.stage_reached), self.config.stage))
            if state is not None:
                state = {**state, "stage_reached": self.stage_reached.detach().clone()}
        return super().state_to_save(state)


def _mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()).pow(2).flatten(1).mean(dim=1) * weights).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask].mean().detach() if mask.any() else torch.zeros((), device=values.device)


def _drop_token(prompt: str, token: str) -> str:
    """The prompt without its trigger word (``"a sks toy in the snow"`` → ``"a toy in the snow"``)."""
    return " ".join(w for w in prompt.split() if w != token)
