"""The world's oracle metrics: an identity encoder, a context classifier and an attribute classifier, trained on
renders, shipped frozen.

They stand where DINO / CLIP-I (subject fidelity) and CLIP-T (prompt fidelity) stand on DreamBench, and are used
only to evaluate, never as a training loss.

- :class:`IdentityEncoder`: image → unit 128-d embedding. Trained contrastively (InfoNCE, Oord et al. 2018) on
  pairs of renders of one identity under different backgrounds, accessories and poses, so the cosine is high for
  one identity across contexts and low across identities. Recolouring changes what an identity looks like and is
  left out of its positives.
- :class:`ContextClassifier`: image → logits for class, background, recolour and accessory.
- :class:`AttributeClassifier`: image → the identity's primary and secondary colour, pattern and shape levels, for attribute recovery (what of a subject a generation carries over).

All see blur, noise and slight colour shifts in training so that they judge generated images, not only clean
renders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.errors import CheckpointError
from hyperbooth.files import atomic_write
from hyperbooth.train.optim import cosine_schedule
from hyperbooth.world import contexts as ctx
from hyperbooth.world.datasets import labels_of, sample_context
from hyperbooth.world.identity import PATTERNS, PRIMARY_COLORS, SECONDARY_COLORS, SHAPE_LEVELS, SHAPE_PARAMS, Identity, identity_class, make_identity
from hyperbooth.world.render import RECOLOR_RGB, render, sample_pose
from hyperbooth.world.splits import identity_seeds

log = logging.getLogger(__name__)

SHIPPED_ORACLES = Path(__file__).resolve().parent.parent / "assets" / "world" / "oracles"
RETRAIN_HINT = "retrain them with `hyperbooth world train-oracles` (about 1.5 hours on one CPU core)"
HEADS = ("class", "background", "recolor", "accessory")
#: The attributes of an identity that attribute recovery reads back from an image, and each one's chance level (the
#: accuracy of the best constant guess under the world's draw: secondary colours are 11 equally likely ones).
ATTRIBUTES = ("primary", "secondary", "pattern", "shape")
ATTRIBUTE_CHANCE = {"primary": 1 / len(PRIMARY_COLORS), "secondary": 1 / (len(SECONDARY_COLORS) - 1), "pattern": 1 / len(PATTERNS), "shape": 1 / SHAPE_LEVELS}
_ATTRIBUTE_SIZES = {"primary": len(PRIMARY_COLORS), "secondary": len(SECONDARY_COLORS), "pattern": len(PATTERNS),
                    **{f"shape_{i}": SHAPE_LEVELS for i in range(SHAPE_PARAMS)}}
IGNORE = -100  # a label the image does not show (cross-entropy's ignore_index)


def _vocab() -> dict[str, tuple[str, ...]]:
    return {"class": ctx.CLASSES, "background": ctx.BACKGROUND_NAMES, "recolor": ctx.RECOLORS, "accessory": ctx.ACCESSORIES}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
    )


class _Backbone(nn.Module):
    """32x32 → 4x4 feature map → pooled (B, 256)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            _block(3, width), nn.AvgPool2d(2),
            _block(width, 2 * width), nn.AvgPool2d(2),
            _block(2 * width, 4 * width), nn.AvgPool2d(2),
            _block(4 * width, 8 * width),
        )
        self.out_dim = 8 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W) in [-1, 1]
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        h = self.net(x)  # (B, C, 4, 4)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 2C)


class IdentityEncoder(nn.Module):
    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.backbone = _Backbone(width)
        self.head = nn.Sequential(nn.Linear(2 * self.backbone.out_dim, 256), nn.SiLU(), nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=-1)  # (B, dim), unit norm


class _HeadClassifier(nn.Module):
    """The CNN backbone with one linear head per label set: ``sizes`` name → number of classes."""

    def __init__(self, sizes: dict[str, int], width: int = 32):
        super().__init__()
        self.backbone = _Backbone(width)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * self.backbone.out_dim, n) for name, n in sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted index per head, ``(B,)`` each."""
        return {name: logits.argmax(dim=-1) for name, logits in self(x).items()}


class ContextClassifier(_HeadClassifier):
    """image → logits for class, background, recolour and accessory."""

    def __init__(self, width: int = 32):
        super().__init__({name: len(v) for name, v in _vocab().items()}, width)


class AttributeClassifier(_HeadClassifier):
    """image → logits for the identity's primary colour, secondary colour, pattern and each shape parameter's level."""

    def __init__(self, width: int = 32):
        super().__init__(_ATTRIBUTE_SIZES, width)


def attribute_labels(identity: Identity, recolor: str | None = None) -> dict[str, int]:
    """The label per head of :class:`AttributeClassifier` for ``identity`` rendered with recolour ``recolor``; ``IGNORE``
    where the image cannot show it (the primary colour of a recoloured subject; the secondary colour of a solid
    subject without a feature, or one the recolour paints over)."""
    secondary = SECONDARY_COLORS.index(identity.secondary)
    painted_over = recolor is not None and sum(abs(a - b) for a, b in zip(RECOLOR_RGB[recolor], identity.secondary)) < 60  # same hue
    hidden_secondary = (identity.pattern == "solid" and identity.feature == "none") or painted_over
    return {
        "primary": IGNORE if recolor else PRIMARY_COLORS.index(identity.primary),
        "secondary": IGNORE if hidden_secondary else secondary,
        "pattern": IGNORE if painted_over else PATTERNS.index(identity.pattern),  # stripes of the recolour's hue vanish
        **{f"shape_{i}": int(round(v * (SHAPE_LEVELS - 1))) for i, v in enumerate(identity.shape)},
    }


# -- data -------------------------------------------------------------------------------------------------------


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and a slight brightness shift: what generated images differ from renders by."""
    b = x.shape[0]
    blur = torch.rand(b, generator=generator) < 0.5
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        x = torch.where(blur[:, None, None, None], blurred, x)
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.15
    x = x + sigma * torch.randn(x.shape, generator=generator)
    x = x + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    return x.clamp(-1, 1)


def identity_views(seeds: list[int], views: int, rng: np.random.Generator, resolution: int = 32, recolor: str | None = None) -> torch.Tensor:
    """``views`` renders of each identity in random contexts (no recolour, or all in ``recolor``) and poses:
    ``(len(seeds) · views, 3, H, W)``, identity-major."""
    images = []
    for seed in seeds:
        for _ in range(views):
            context = sample_context(rng, identity_class(seed), "test", recolor=False)
            if recolor is not None:
                context = dataclasses.replace(context, recolor=recolor)
            images.append(render(seed, context=context, pose=sample_pose(rng), resolution=resolution, scene_seed=int(rng.integers(2**31))))
    return _to_tensor(images)


def context_batch(seeds: list[int], rng: np.random.Generator, resolution: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One render per identity in a random context; images and label indices per head."""
    images, labels = [], {name: [] for name in HEADS}
    for seed in seeds:
        context = sample_context(rng, identity_class(seed), "test")
        images.append(render(seed, context=context, pose=sample_pose(rng), resolution=resolution, scene_seed=int(rng.integers(2**31))))
        for name, value in labels_of(identity_class(seed), context).items():
            labels[name].append(value)
    return _to_tensor(images), {name: torch.tensor(v) for name, v in labels.items()}


# -- training ---------------------------------------------------------------------------------------------------


def attribute_batch(seeds: list[int], rng: np.random.Generator, resolution: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One render per identity in a random context (recolours included) and pose; images and
    :func:`attribute_labels` per head."""
    images, labels = [], {name: [] for name in _ATTRIBUTE_SIZES}
    for seed in seeds:
        identity = make_identity(seed)
        context = sample_context(rng, identity.class_name, "test")
        images.append(render(seed, context=context, pose=sample_pose(rng), resolution=resolution, scene_seed=int(rng.integers(2**31))))
        for name, value in attribute_labels(identity, context.recolor).items():
            labels[name].append(value)
    return _to_tensor(images), {name: torch.tensor(v) for name, v in labels.items()}


@dataclass
class OracleTrainConfig:
    steps: int = 2000
    batch_identities: int = 64  # identity encoder: identities per batch (x2 views)
    batch_size: int = 128  # context classifier
    pool_identities: int = 6000  # renders made once, then sampled with augmentation
    pool_views: int = 4
    pool_contexts: int = 24000
    lr: float = 2e-3
    temperature: float = 0.1
    seed: int = 0
    attribute_renders: int = 24000  # attribute classifier: labelled renders, sampled with augmentation
    attribute_steps: int = 2000


def info_nce_loss(model: nn.Module, pool: torch.Tensor, batch_identities: int, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """InfoNCE (Oord et al. 2018) over two augmented views of ``batch_identities`` identities drawn from
    ``pool (M, V, 3, H, W)``; ``model`` maps images to unit embeddings. The positive of a view is the other view."""
    ids = torch.randperm(pool.shape[0], generator=gen)[:batch_identities]
    views = torch.stack([torch.randperm(pool.shape[1], generator=gen)[:2] for _ in ids])  # (M, 2)
    x = augment(pool[ids[:, None], views].flatten(0, 1), gen)  # (2M, 3, H, W): views 2i, 2i+1 of identity i
    z = model(x)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, torch.arange(z.shape[0]) ^ 1)


def train_identity_encoder(cfg: OracleTrainConfig, progress: bool = True) -> IdentityEncoder:
    """InfoNCE over a pre-rendered pool: ``pool_identities`` train identities x ``pool_views`` views each."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    seeds = list(identity_seeds("train", cfg.pool_identities))
    pool = identity_views(seeds, cfg.pool_views, rng).view(len(seeds), cfg.pool_views, 3, 32, 32)  # (M, V, 3, H, W)
    model = IdentityEncoder().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = cosine_schedule(opt, warmup=0, total=cfg.steps, min_ratio=0.0)  # plain cosine to 0
    for _ in tqdm(range(cfg.steps), desc="identity oracle", disable=not progress):
        loss = info_nce_loss(model, pool, cfg.batch_identities, cfg.temperature, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_context_classifier(cfg: OracleTrainConfig, progress: bool = True) -> ContextClassifier:
    """Cross-entropy on every head over a pre-rendered pool of ``pool_contexts`` labelled renders."""
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    images, labels = context_batch(list(identity_seeds("train", cfg.pool_contexts, start=10**6)), rng)
    return _fit_heads(ContextClassifier().train(), images, labels, cfg.steps, cfg, gen, "context oracle", progress)


def train_attribute_classifier(cfg: OracleTrainConfig, progress: bool = True) -> AttributeClassifier:
    """Cross-entropy on every attribute head over a pre-rendered pool of ``attribute_renders`` labelled renders of
    train identities, augmented; labels an image does not show are ignored."""
    torch.manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    images, labels = attribute_batch(list(identity_seeds("train", cfg.attribute_renders, start=2 * 10**6)), rng)
    return _fit_heads(AttributeClassifier().train(), images, labels, cfg.attribute_steps, cfg, gen, "attribute oracle", progress)


def _fit_heads(model: _HeadClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int, cfg: OracleTrainConfig,
               gen: torch.Generator, desc: str, progress: bool) -> _HeadClassifier:
    """AdamW on the summed cross-entropy of every head (``IGNORE`` labels skipped) over augmented batches of
    ``cfg.batch_size`` drawn from ``images``, cosine learning rate to 0."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = cosine_schedule(opt, warmup=0, total=steps, min_ratio=0.0)  # plain cosine to 0
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        idx = torch.randperm(len(images), generator=gen)[: cfg.batch_size]
        logits = model(augment(images[idx], gen))
        loss = sum(F.cross_entropy(logits[name], labels[name][idx], ignore_index=IGNORE) for name in model.heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# -- evaluation -------------------------------------------------------------------------------------------------


def roc_auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Area under the ROC curve = P(a positive scores above a negative), ties counting one half
    (the Mann–Whitney U statistic, computed over all pairs)."""
    pos, neg = scores_pos.flatten()[:, None], scores_neg.flatten()[None, :]
    return float((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean())


@torch.no_grad()
def evaluate_oracles(identity: IdentityEncoder, context: ContextClassifier, n: int = 500, seed: int = 123, split: str = "test",
                     attributes: AttributeClassifier | None = None) -> dict[str, float]:
    """Figures on ``n`` identities of ``split`` (held-out by default): identity-verification ROC-AUC (same identity in
    two contexts and poses vs two identities), context accuracy per head and, with ``attributes``, attribute
    accuracy on renders."""
    rng = np.random.default_rng(seed)
    seeds = list(identity_seeds(split, n))
    z = identity(identity_views(seeds, 2, rng)).view(n, 2, -1)  # (n, 2, d)
    pos = (z[:, 0] * z[:, 1]).sum(-1)  # same identity, different context and pose
    neg = (z[:, 0] * z[:, 1].roll(1, dims=0)).sum(-1)  # different identities
    results = {"identity_roc_auc": roc_auc(pos, neg), "identity_cos_same": float(pos.mean()), "identity_cos_diff": float(neg.mean())}
    x, labels = context_batch(seeds, rng)
    pred = context.predict(x)
    for name in HEADS:
        results[f"{name}_accuracy"] = float((pred[name] == labels[name]).float().mean())
    if attributes is not None:
        x, labels = attribute_batch(seeds, rng)
        correct = attribute_correct(attributes.predict(x), labels)
        for name in ATTRIBUTES:
            results[f"attribute_{name}_accuracy"] = float(correct[name].nanmean())
    return results


def attribute_correct(pred: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per image and attribute of :data:`ATTRIBUTES`: 1.0 where the prediction equals the label, NaN where the label
    is ``IGNORE``; ``shape`` is the mean over the shape parameters."""
    out = {}
    for name in _ATTRIBUTE_SIZES:
        hit = (pred[name] == labels[name]).float()
        out[name] = torch.where(labels[name] == IGNORE, torch.full_like(hit, float("nan")), hit)
    out["shape"] = torch.stack([out.pop(f"shape_{i}") for i in range(SHAPE_PARAMS)]).mean(0)
    return out


# -- files ------------------------------------------------------------------------------------------------------


def save_oracles(folder: Path, identity: IdentityEncoder, context: ContextClassifier, cfg: OracleTrainConfig, figures: dict,
                 attributes: AttributeClassifier | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = [("identity", identity), ("context", context)] + ([("attributes", attributes)] if attributes is not None else [])
    for name, model in models:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(folder / f"{name}.safetensors", lambda tmp, state=state: save_file(state, tmp))
    meta = {"vocab": _vocab(), "attributes": _ATTRIBUTE_SIZES if attributes is not None else None, "train_config": asdict(cfg), "figures": figures}
    atomic_write(folder / "oracles.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


@dataclass
class Oracles:
    """The frozen oracles; ``attributes`` is ``None`` for a folder saved without attribute heads (attribute recovery
    is then NaN). ``prototypes`` caches identity prototypes (:func:`hyperbooth.world.fidelity.identity_prototype`)."""

    identity: IdentityEncoder
    context: ContextClassifier
    attributes: AttributeClassifier | None = None
    prototypes: dict = field(default_factory=dict, init=False, repr=False, compare=False)


    @classmethod
    def load(cls, folder: str | os.PathLike | None = None) -> Oracles:
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else SHIPPED_ORACLES
        meta_path = folder / "oracles.json"
        if not meta_path.is_file():
            raise CheckpointError(f"oracle folder {folder} lacks oracles.json; {RETRAIN_HINT}")
        meta = json.loads(meta_path.read_text())
        if {k: tuple(v) for k, v in meta["vocab"].items()} != _vocab():
            raise CheckpointError(f"oracles in {folder} were trained on another world vocabulary; {RETRAIN_HINT}")
        models = {"identity": IdentityEncoder(), "context": ContextClassifier()}
        if meta.get("attributes"):
            if {k: int(v) for k, v in meta["attributes"].items()} != _ATTRIBUTE_SIZES:
                raise CheckpointError(f"attribute heads in {folder} were trained on another world vocabulary; {RETRAIN_HINT}")
            models["attributes"] = AttributeClassifier()
        for name, model in models.items():
            path = folder / f"{name}.safetensors"
            try:
                model.load_state_dict(load_file(str(path)))
            except Exception as e:
                raise CheckpointError(f"oracle weights {path} are missing or damaged ({type(e).__name__}); {RETRAIN_HINT}") from None
            model.eval().requires_grad_(False)
        return cls(models["identity"], models["context"], models.get("attributes"))


def train_oracles(out: Path, cfg: OracleTrainConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    identity = train_identity_encoder(cfg)
    context = train_context_classifier(cfg)
    attributes = train_attribute_classifier(cfg)
    figures = evaluate_oracles(identity, context, attributes=attributes)
    figures["train_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    save_oracles(out, identity, context, cfg, figures, attributes)
    return figures


def add_attribute_classifier(folder: Path, cfg: OracleTrainConfig) -> dict[str, float]:
    """Train the attribute classifier and add it to the oracle folder ``folder`` (its identity encoder and context
    classifier stay as they are); returns the folder's figures, attribute accuracy added."""
    t0 = time.perf_counter()
    oracles = Oracles.load(folder)
    meta = json.loads((Path(folder) / "oracles.json").read_text())
    # the folder's recorded config with this run's attribute settings: what the classifier is trained with and recorded as
    cfg = OracleTrainConfig(**{**meta.get("train_config", {}), **{k: v for k, v in asdict(cfg).items() if k.startswith("attribute_")}})
    attributes = train_attribute_classifier(cfg)
    figures = {**meta.get("figures", {}), **evaluate_oracles(oracles.identity, oracles.context, attributes=attributes)}
    figures["attribute_train_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    save_oracles(folder, oracles.identity, oracles.context, cfg, figures, attributes)
    return figures
