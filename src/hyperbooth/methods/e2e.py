"""The end-to-end hypernetwork (Shrestha et al., "Finetuning-Free Personalization of Text to Image Generation via
Hypernetworks", arXiv 2511.03156): image encoder → transformer weight decoder → a rank-r LoRA per target layer.

The decoder holds one learned query per target layer. The queries attend to each other and to the image tokens
(cross-attention) through ``layers`` pre-norm transformer decoder layers; each query's output is mapped to its
layer's factors by a linear head shared by all layers of the same shape ``(d_in, d_out)``:

    A_l = head_A(h_l) / sqrt(d_in)    (r, d_in)       B_l = head_B(h_l)    (d_out, r)

``head_B`` starts at zero, so ΔW = 0 and training starts from the base model, while gradients still reach both
heads. Several reference images per subject are combined by averaging their tokens before the decoder
(``multi_reference="tokens"``) or by averaging the predicted ΔW (``"mean_delta"``, exact, rank k·r).

Trained end to end through the frozen UNet with ``‖ε − ε̂‖² + λ · Σ_l ‖ΔW_l‖²_F`` (:meth:`E2EHyperNetwork.training_loss`,
run by ``hyperbooth train``, :mod:`hyperbooth.train.engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone
from hyperbooth.diffusion import diffusion_loss
from hyperbooth.encoders import build_encoder, encode_images
from hyperbooth.errors import ConfigError
from hyperbooth.lora.weights import LoRALayer, LoRAWeights, combine
from hyperbooth.methods.base import Personalizer, TrainBatch, register


#: The e2e hypernetwork trained on the world and shipped inside the package (``configs/e2e_world.yaml``).
SHIPPED_E2E = Path(__file__).resolve().parent.parent / "assets" / "world" / "e2e"


@dataclass
class E2EConfig:
    rank: int = 2
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    encoder: str = "world"  # "world" or a transformers vision model folder / hub id
    encoder_dim: int = 128  # token size of the world encoder
    targets: tuple[str, ...] = ()  # UNet module patterns; empty: the backbone's default (its attention projections)
    multi_reference: str = "tokens"  # "tokens" or "mean_delta"
    output_reg: float = 1e-3  # λ of the output regularization Σ_l ‖ΔW_l‖²_F in the training loss; 0 allowed (the ablation)

    def validate(self) -> None:
        if self.output_reg < 0:
            raise ConfigError(f"hypernet.output_reg={self.output_reg} must be >= 0")
        if self.rank < 1:
            raise ConfigError(f"hypernet.rank={self.rank} must be at least 1")
        if self.d_model % self.heads:
            raise ConfigError(f"hypernet.d_model={self.d_model} must be divisible by hypernet.heads={self.heads}")
        if self.multi_reference not in ("tokens", "mean_delta"):
            raise ConfigError(f"hypernet.multi_reference={self.multi_reference!r} must be 'tokens' or 'mean_delta'")


def _group(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


@register
class E2EHyperNetwork(Personalizer):
    """references ``(N, k, 3, H, W)`` → :class:`LoRAWeights` with N subjects, for the given target shapes."""

    method = "e2e"
    config_class = E2EConfig

    def __init__(self, config: E2EConfig, target_shapes: dict[str, tuple[int, int]]):
        super().__init__(config, target_shapes)
        self.names = list(self.target_shapes)
        d = config.d_model
        self.encoder = build_encoder(config.encoder, config.encoder_dim)
        self.token_proj = nn.Linear(self.encoder.out_dim, d)
        self.queries = nn.Parameter(torch.randn(len(self.names), d) * 0.02)  # one per target layer
        layer = nn.TransformerDecoderLayer(d, config.heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, config.layers)
        self.norm = nn.LayerNorm(d)
        groups = sorted({_group(s) for s in self.target_shapes.values()})
        self.group_index = {g: [i for i, n in enumerate(self.names) if _group(self.target_shapes[n]) == g] for g in groups}
        r = config.rank
        self.head_A = nn.ModuleDict({g: nn.Linear(d, r * int(g.split("x")[0])) for g in groups})
        self.head_B = nn.ModuleDict({g: nn.Linear(d, int(g.split("x")[1]) * r) for g in groups})
        for head in self.head_B.values():  # ΔW = 0 at init: training starts from the base model
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    # -- forward ----------------------------------------------------------------------------------------------

    def encode(self, references: torch.Tensor) -> torch.Tensor:
        """``(N, k, 3, H, W)`` → memory tokens ``(N, k, T, d_model)``."""
        n, k = references.shape[:2]
        return self.token_proj(encode_images(self.encoder, references.flatten(0, 1))).unflatten(0, (n, k))

    def decode(self, memory: torch.Tensor) -> LoRAWeights:
        """memory ``(N, T, d_model)`` → LoRAWeights for N subjects."""
        n = memory.shape[0]
        h = self.decoder(self.queries.expand(n, -1, -1), memory)  # (N, L, d_model)
        h = self.norm(h)
        r = self.config.rank
        layers = {}
        for g, idx in self.group_index.items():
            d_in, d_out = map(int, g.split("x"))
            hg = h[:, idx]  # (N, L_g, d_model)
            A = self.head_A[g](hg).view(n, len(idx), r, d_in) / math.sqrt(d_in)
            B = self.head_B[g](hg).view(n, len(idx), d_out, r)
            for j, i in enumerate(idx):
                layers[self.names[i]] = LoRALayer(A[:, j], B[:, j], float(r))
        return LoRAWeights({name: layers[name] for name in self.names})

    def forward(self, references: torch.Tensor) -> LoRAWeights:
        if references.ndim == 4:  # (N, 3, H, W): one reference each
            references = references[:, None]
        if references.ndim != 5 or references.shape[2] != 3:
            raise ConfigError(f"references must be (N, k, 3, H, W) images, got shape {tuple(references.shape)}")
        memory = self.encode(references)  # (N, k, T, d)
        k = memory.shape[1]
        if k == 1 or self.config.multi_reference == "tokens":
            return self.decode(memory.mean(dim=1))
        per_image = self.decode(memory.flatten(0, 1))  # N·k subjects
        n = memory.shape[0]
        views = [per_image.select(list(range(j, n * k, k))) for j in range(k)]  # view j of every subject
        return combine(views, [1.0 / k] * k)

    # -- training -------------------------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``‖target − f_{W+ΔW(I)}(x_t, t, c)‖²`` (Min-SNR weighted) ``+ λ · mean_n Σ_l ‖ΔW_l‖²_F``: the diffusion loss
        through the frozen denoiser with each sample's predicted LoRA, plus the output regularization."""
        weights = self(batch.references)  # LoRAWeights, N = batch
        with backbone.apply_lora(weights, mode="per_sample"):
            pred = backbone.denoise(batch.x_t, batch.t, batch.cond)
        diff = diffusion_loss(pred, batch.target, batch.loss_weights)
        reg = weights.frobenius_sq().mean()
        return diff + self.config.output_reg * reg, {"diffusion_loss": diff, "reg": reg}
