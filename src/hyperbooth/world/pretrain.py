"""Pre-training the world's image encoder for the hypernetworks (``hyperbooth world train-encoder``).

The papers' hypernetworks read frozen, pre-trained image encoders (CLIP / DINO in the e2e paper, a ViT in
HyperDreamBooth, CLIP + a face-ID model in HyperLoRA): identity features come ready-made, and the hypernetwork
only learns to turn them into weights. The world has no such model, so hyperbooth trains one: the
:class:`~hyperbooth.encoders.WorldImageEncoder` (8x8 tokens) with a pooled projection head, by InfoNCE (Oord et al.
2018) over renders of one identity in different backgrounds, accessories and poses — the world's face-ID model.
The head is dropped; the tokens are what the hypernetwork reads.

It is not the oracle: another architecture (token grid, no pooling inside), another seed and other identities
(train split, a disjoint seed range), and it is never used to measure anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.encoders import WORLD_ENCODER_WEIGHTS, WorldImageEncoder
from hyperbooth.files import atomic_write
from hyperbooth.train.optim import cosine_schedule


@dataclass
class EncoderPretrainConfig:
    steps: int = 600
    batch_identities: int = 64  # identities per batch, two views each
    pool_identities: int = 6000  # renders made once, then sampled with augmentation
    pool_views: int = 4
    lr: float = 2e-3
    temperature: float = 0.1
    dim: int = 128
    width: int = 64
    seed: int = 7
    first_identity: int = 5_000_000  # a seed range the oracles' training pool does not use


class _Contrastive(nn.Module):
    def __init__(self, encoder: WorldImageEncoder, dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(2 * encoder.out_dim, 256), nn.SiLU(), nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(x)  # (B, 64, d)
        pooled = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)  # (B, 2d)
        return F.normalize(self.head(pooled), dim=-1)


def pretrain_world_encoder(cfg: EncoderPretrainConfig, progress: bool = True) -> tuple[WorldImageEncoder, dict]:
    """InfoNCE over a pre-rendered pool of train identities; returns the encoder (head dropped) and figures."""
    from tqdm.auto import tqdm

    from hyperbooth.world.oracles import identity_views, info_nce_loss, roc_auc
    from hyperbooth.world.splits import identity_seeds

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    seeds = list(identity_seeds("train", cfg.pool_identities, start=cfg.first_identity))
    pool = identity_views(seeds, cfg.pool_views, rng).view(len(seeds), cfg.pool_views, 3, 32, 32)  # (M, V, 3, H, W)
    model = _Contrastive(WorldImageEncoder(dim=cfg.dim, width=cfg.width), cfg.dim).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = cosine_schedule(opt, warmup=0, total=cfg.steps, min_ratio=0.0)  # plain cosine to 0
    for _ in tqdm(range(cfg.steps), desc="world encoder", disable=not progress):
        loss = info_nce_loss(model, pool, cfg.batch_identities, cfg.temperature, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():  # identity verification on validation identities: does the encoder see identity?
        val = list(identity_seeds("val", 300))
        z = model(identity_views(val, 2, np.random.default_rng(cfg.seed + 1))).view(len(val), 2, -1)
        pos, neg = (z[:, 0] * z[:, 1]).sum(-1), (z[:, 0] * z[:, 1].roll(1, dims=0)).sum(-1)
    figures = {"val_identity_roc_auc": roc_auc(pos, neg), "final_loss": loss.item(), "train_minutes": round((time.perf_counter() - t0) / 60, 1)}
    return model.encoder.requires_grad_(False), figures


def save_world_encoder(folder: Path, encoder: WorldImageEncoder, cfg: EncoderPretrainConfig, figures: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(folder / WORLD_ENCODER_WEIGHTS, lambda tmp: save_file(state, tmp))
    meta = {"train_config": asdict(cfg), "figures": figures}
    atomic_write(folder / "world_encoder.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder
