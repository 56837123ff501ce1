"""HyperDreamBooth (Ruiz et al., "HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models",
2023): a hypernetwork that predicts Lightweight-DreamBooth (LiDB) weights from one image by iterative refinement,
trained on pre-optimized per-identity weights, then an optional rank-relaxed fast fine-tune.

The four stages and where they live:

1. **LiDB** (:mod:`hyperbooth.methods.lidb`): per target layer ``A = A_train · A_aux``, ``B = B_aux · B_train`` with
   frozen random orthonormal bases from a per-layer seed; ``A_train (r, a)`` and ``B_train (b, r)`` are the
   personalized variables (``r · (a + b)`` per layer).
2. **Pre-optimization** (:mod:`hyperbooth.train.preoptimize`, ``hyperbooth preoptimize``): LiDB variables fitted with
   the diffusion loss for a bank of training identities at once (one batch row per identity, per-sample LoRA); the
   targets ``θ*`` are written one safetensors file per shard, read here by :class:`LiDBTargets`.
3. **The hypernetwork** (:class:`HyperDreamBooth`, ``hyperbooth train`` with ``method: hyperdreambooth``): a frozen
   image encoder, then a transformer decoder with one token per target layer. Each token is the layer's learned
   query plus an embedding of the layer's *current* LiDB estimate; the decoder (self-attention across layers,
   cross-attention to the image tokens) predicts a delta, zero at initialisation, that is added to the estimate —
   ``iterations`` (K) times with shared weights, any K at inference. The first estimate ``θ_0`` is learned (started
   at the mean of the pre-optimized targets). Loss: ``diffusion_loss · ‖target − f_{W+ΔW(θ̂_K)}(x_t, t, c)‖²
   + weight_loss · mean_k mean ‖θ̂_k − θ*‖²`` (each term switchable, for the paper's ablation; the weight term on
   samples whose identity has a pre-optimized target).
4. **Rank-relaxed fast fine-tuning** (:func:`fast_finetune`): from the predicted rank-r LoRA, a trainable rank-r′
   LoRA beside it (``B′ = 0`` at the start; the predicted factors trainable too unless ``fast_finetune_predicted``
   is off), trained a few steps (the paper: 40) with the DreamBooth loss on the references, returned **exactly** as
   one rank-(r + r′) LoRA by concatenating factors (:func:`hyperbooth.lora.weights.combine`; no SVD truncation).

The output is ordinary :class:`~hyperbooth.lora.weights.LoRAWeights`, so export, injection, HM-CFG and mixing need
nothing new.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone
from hyperbooth.diffusion import diffusion_loss
from hyperbooth.encoders import build_encoder, encode_images
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.weights import LoRAWeights, combine, stack
from hyperbooth.methods.base import Personalizer, TrainBatch, register
from hyperbooth.methods.lidb import DEFAULT_A, DEFAULT_B, DEFAULT_RANK, aux_bases, lidb_weights, num_variables
from hyperbooth.prompts import RARE_TOKEN

log = logging.getLogger(__name__)

#: The HyperDreamBooth checkpoint trained on the world and shipped inside the package (when one is shipped).
SHIPPED_HYPERDREAMBOOTH = Path(__file__).resolve().parent.parent / "assets" / "world" / "hyperdreambooth"

#: What a pre-optimization folder holds: ``lidb-<shard>.safetensors`` files and this summary.
TARGETS_CONFIG = "preopt_config.json"
SHARD_GLOB = "lidb-*.safetensors"


@dataclass
class HyperDreamBoothConfig:
    rank: int = DEFAULT_RANK  # LiDB rank r
    a: int = DEFAULT_A  # LiDB down dimension (A_aux: (a, d_in))
    b: int = DEFAULT_B  # LiDB up dimension (B_aux: (d_out, b))
    basis_seed: int = 0  # the per-layer seeds of the frozen bases derive from it (methods.lidb.layer_seed)
    learnable_bases: bool = False  # train A_aux / B_aux with the hypernetwork (a variant; the paper keeps them frozen)
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    encoder: str = "world-pretrained"  # "world", "world-pretrained" or a transformers vision model folder / hub id (CLIP, DINO, ViT)
    encoder_dim: int = 128  # token size of the trainable world encoder
    targets: tuple[str, ...] = ()  # UNet module patterns; empty: the backbone's default (its attention projections)
    text_targets: tuple[str, ...] = ()  # text-encoder module patterns (SD: q_proj, k_proj, v_proj, out_proj); empty: UNet only
    iterations: int = 4  # K refinement steps (any K >= 1 at inference)
    diffusion_loss: float = 1.0  # weight of the diffusion loss through the frozen UNet; 0 turns it off
    weight_loss: float = 1.0  # λ_w of mean ‖θ̂ − θ*‖² against the pre-optimized targets; 0 turns it off
    targets_path: str = ""  # the pre-optimization folder (hyperbooth preoptimize) the weight loss reads
    fast_finetune_steps: int = 0  # rank-relaxed fast fine-tune steps in personalize (the paper: 40); 0 = hypernetwork only
    fast_finetune_rank: int = 4  # r' of the relaxation LoRA beside the prediction
    fast_finetune_lr: float = 1e-3
    fast_finetune_predicted: bool = True  # train the predicted factors too (else only the relaxation)
    fast_finetune_seed: int = 0
    token: str = RARE_TOKEN  # the fast fine-tune's prompt "a <token> <class>"

    #: the fields that may change after training (``with_options``, ``--iterations``, ``--fast-finetune-steps``)
    INFERENCE_OPTIONS: ClassVar[tuple[str, ...]] = ("iterations", "fast_finetune_steps", "fast_finetune_rank", "fast_finetune_lr",
                                                   "fast_finetune_predicted", "fast_finetune_seed")

    def validate(self) -> None:
        for key in ("learnable_bases", "fast_finetune_predicted"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"hypernet.{key}={getattr(self, key)!r} must be true or false")
        for key in ("basis_seed", "fast_finetune_seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"hypernet.{key}={value!r} must be an integer >= 0")
        for key in ("diffusion_loss", "weight_loss", "fast_finetune_lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"hypernet.{key}={value!r} must be a number")
        for key in ("rank", "a", "b", "d_model", "layers", "heads", "encoder_dim", "fast_finetune_rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hypernet.{key}={value!r} must be a positive integer")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"hypernet.iterations={self.iterations!r} (K, the refinement steps) must be at least 1")
        if isinstance(self.fast_finetune_steps, bool) or not isinstance(self.fast_finetune_steps, int) or self.fast_finetune_steps < 0:
            raise ConfigError(f"hypernet.fast_finetune_steps={self.fast_finetune_steps!r} must be an integer >= 0")
        if self.d_model % self.heads:
            raise ConfigError(f"hypernet.d_model={self.d_model} must be divisible by hypernet.heads={self.heads}")
        for key in ("diffusion_loss", "weight_loss"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"hypernet.{key}={value!r} must be a number >= 0 (0 turns the term off)")
        if self.diffusion_loss == 0 and self.weight_loss == 0:
            raise ConfigError("hypernet.diffusion_loss and hypernet.weight_loss are both 0: nothing to train on")
        if self.weight_loss > 0 and not self.targets_path:
            raise ConfigError(f"hypernet.weight_loss={self.weight_loss} needs hypernet.targets_path, the folder `hyperbooth preoptimize` wrote "
                              "(or set hypernet.weight_loss=0 to train with the diffusion loss alone)")
        if self.learnable_bases and self.weight_loss > 0:
            raise ConfigError("hypernet.learnable_bases with hypernet.weight_loss > 0: the pre-optimized targets live in the frozen bases; "
                              "train learnable bases with the diffusion loss alone (weight_loss: 0)")
        if not self.fast_finetune_lr > 0:
            raise ConfigError(f"hypernet.fast_finetune_lr={self.fast_finetune_lr!r} must be a positive number")
        if not self.token or any(c.isspace() for c in self.token):
            raise ConfigError(f"hypernet.token={self.token!r} must be one non-empty word")


def lidb_dims(shapes: dict[str, tuple[int, int]], a: int, b: int) -> dict[str, tuple[int, int]]:
    """Per layer ``(a_l, b_l) = (min(a, d_in), min(b, d_out))``, the LiDB variables' sizes."""
    return {name: (min(a, d_in), min(b, d_out)) for name, (d_in, d_out) in shapes.items()}


def lidb_init(shapes: dict[str, tuple[int, int]], rank: int, a: int, b: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The starting LiDB variables every identity shares (one gauge for all targets): ``A_train (r, a_l)``
    uniform in ``±1/sqrt(a_l)`` (PEFT's LoRA default) from ``seed`` and the layer's name, ``B_train (b_l, r)`` zero."""
    from hyperbooth.methods.lidb import layer_seed

    out = {}
    for name, (a_l, b_l) in lidb_dims(shapes, a, b).items():
        g = torch.Generator().manual_seed(layer_seed(seed, name) + 7)
        A = (torch.rand(rank, a_l, generator=g) * 2 - 1) / math.sqrt(a_l)
        out[name] = (A, torch.zeros(b_l, rank))
    return out


#: target names of the text encoder carry this prefix in a HyperDreamBooth's ``target_shapes``
TEXT_PREFIX = "text_encoder:"


def all_target_shapes(backbone: Backbone, targets: Sequence[str] = (), text_targets: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
    """The UNet's target shapes and, with ``text_targets``, the text encoder's (names prefixed ``text_encoder:``)."""
    from hyperbooth.lora.inject import target_shapes as module_target_shapes

    shapes = dict(backbone.target_shapes(tuple(targets) or None))
    if text_targets:
        if "text_encoder" not in backbone.components:
            raise ConfigError(f"text_targets={list(text_targets)}: the {backbone.name} backbone's text encoder takes no LoRA")
        text = module_target_shapes(backbone.components["text_encoder"], tuple(text_targets))
        if not text:
            raise ConfigError(f"text_targets={list(text_targets)} match no module of the text encoder")
        shapes.update({TEXT_PREFIX + name: shape for name, shape in text.items()})
    return shapes


def split_components(weights: LoRAWeights) -> LoRAWeights | dict[str, LoRAWeights]:
    """A LoRA over UNet and ``text_encoder:`` layers → ``{"unet": …, "text_encoder": …}``; UNet-only stays as it is."""
    text = {n[len(TEXT_PREFIX):]: layer for n, layer in weights.items() if n.startswith(TEXT_PREFIX)}
    if not text:
        return weights
    return {"unet": LoRAWeights({n: layer for n, layer in weights.items() if not n.startswith(TEXT_PREFIX)}), "text_encoder": LoRAWeights(text)}


# -- pre-optimized targets ------------------------------------------------------------------------------------------


class LiDBTargets:
    """The pre-optimized LiDB variables of a bank of identities (``hyperbooth preoptimize``'s folder).

    ``A[name] (M, r, a_l)``, ``B[name] (M, b_l, r)`` for M identities, ``row[identity_seed]`` → index. Every shard is
    checked against the hypernetwork's LiDB settings (rank, a, b, basis seed, target layers and shapes); the first
    difference is named with its file.
    """

    def __init__(self, folder: str | Path, rank: int, a: int, b: int, basis_seed: int, shapes: dict[str, tuple[int, int]]):
        from safetensors import safe_open

        folder = Path(folder)
        files = sorted(folder.glob(SHARD_GLOB)) if folder.is_dir() else []
        if not files:
            raise CheckpointError(f"hypernet.targets_path={str(folder)!r} holds no pre-optimized shards ({SHARD_GLOB}); run `hyperbooth preoptimize` first")
        want = {"rank": rank, "a": a, "b": b, "basis_seed": basis_seed}
        parts: dict[str, list[torch.Tensor]] = {}
        seeds: list[int] = []
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {key: f.get_tensor(key) for key in f.keys()}
            except Exception as e:
                raise CheckpointError(f"pre-optimization shard {path} is missing or damaged ({type(e).__name__})") from None
            try:
                lidb = json.loads(meta.get("hyperbooth.lidb", "{}"))
                shard_shapes = {k: tuple(v) for k, v in json.loads(meta.get("hyperbooth.target_shapes", "{}")).items()}
            except ValueError:
                raise CheckpointError(f"pre-optimization shard {path} has an unreadable header") from None
            for key, value in want.items():
                if lidb.get(key) != value:
                    raise CheckpointError(f"pre-optimization shard {path} was made with {key}={lidb.get(key)!r}, this hypernetwork uses {key}={value!r}")
            if shard_shapes != shapes:
                diff = sorted(set(shard_shapes.items()) ^ set(shapes.items()))
                raise CheckpointError(f"pre-optimization shard {path} is for other target layers (first that differs: {diff[0][0]!r})")
            if "identities" not in tensors:
                raise CheckpointError(f"pre-optimization shard {path} does not list its identities")
            seeds.extend(int(s) for s in tensors["identities"].tolist())
            for name in shapes:
                for part in ("A_train", "B_train"):
                    key = f"{name}.{part}"
                    if key not in tensors:
                        raise CheckpointError(f"pre-optimization shard {path} has no {key!r}")
                    parts.setdefault(key, []).append(tensors[key].float())
        if len(set(seeds)) != len(seeds):
            raise CheckpointError(f"pre-optimization folder {folder} lists an identity twice")
        summary = folder / TARGETS_CONFIG
        if summary.is_file():
            try:
                expected = int(json.loads(summary.read_text()).get("shards", len(files)))
            except (OSError, ValueError, TypeError):
                raise CheckpointError(f"{summary} cannot be read") from None
            if expected != len(files):
                raise CheckpointError(f"pre-optimization in {folder} is unfinished ({len(files)} of {expected} shards); "
                                      "finish it with `hyperbooth preoptimize --resume` first")
        self.source = meta.get("hyperbooth.identities", "world")  # "world" or "folder" (the last shard's; all agree)
        self.digest = meta.get("hyperbooth.identity_digest", "")
        self.folder = folder
        self.row = {s: i for i, s in enumerate(seeds)}
        self.A = {name: torch.cat(parts[f"{name}.A_train"]) for name in shapes}
        self.B = {name: torch.cat(parts[f"{name}.B_train"]) for name in shapes}

    def __len__(self) -> int:
        return len(self.row)

    def rows(self, identities: Sequence[int]) -> torch.Tensor:
        """Row indices of these identity seeds; one without a target is named."""
        missing = [int(s) for s in identities if int(s) not in self.row]
        if missing:
            raise CheckpointError(f"identity {missing[0]} has no pre-optimized target in {self.folder} "
                                  "(the training data's identity bank must be the one `hyperbooth preoptimize` used)")
        return torch.tensor([self.row[int(s)] for s in identities], dtype=torch.long)


# -- the hypernetwork -------------------------------------------------------------------------------------------------


@register
class HyperDreamBooth(Personalizer):
    """references ``(N, k, 3, H, W)`` → LiDB weights by K refinement steps → :class:`LoRAWeights` with N subjects
    (rank r, or r + r′ after the fast fine-tune)."""

    method = "hyperdreambooth"
    config_class = HyperDreamBoothConfig

    def __init__(self, config: HyperDreamBoothConfig, target_shapes: dict[str, tuple[int, int]]):
        super().__init__(config, target_shapes)
        cfg = config
        self.names = list(self.target_shapes)
        self.dims = lidb_dims(self.target_shapes, cfg.a, cfg.b)  # name → (a_l, b_l)
        groups = sorted({self._group(n) for n in self.names})
        self.group_index = {g: [i for i, n in enumerate(self.names) if self._group(n) == g] for g in groups}
        d, r = cfg.d_model, cfg.rank
        self.encoder = build_encoder(cfg.encoder, cfg.encoder_dim)
        self.token_proj = nn.Linear(self.encoder.out_dim, d)
        self.queries = nn.Parameter(torch.randn(len(self.names), d) * 0.02)  # one token per target layer
        layer = nn.TransformerDecoderLayer(d, cfg.heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.layers)
        self.norm = nn.LayerNorm(d)
        self.embed = nn.ModuleDict({g: nn.Linear(self._size(g), d) for g in groups})  # current estimate → token
        self.head = nn.ModuleDict({g: nn.Linear(d, self._size(g)) for g in groups})  # token → delta of the estimate
        for head in self.head.values():  # the delta is zero at init: every refinement step starts as the identity
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        init = lidb_init(self.target_shapes, r, cfg.a, cfg.b, cfg.basis_seed)
        self.theta0 = nn.ParameterDict({g: nn.Parameter(torch.stack([self._flat(*init[self.names[i]]) for i in idx]))
                                        for g, idx in self.group_index.items()})  # (L_g, v_g): the first estimate
        bases = aux_bases(self.target_shapes, cfg.a, cfg.b, cfg.basis_seed)
        for i, name in enumerate(self.names):
            A_aux, B_aux = bases[name]
            if cfg.learnable_bases:
                self.register_parameter(f"A_aux_{i}", nn.Parameter(A_aux))
                self.register_parameter(f"B_aux_{i}", nn.Parameter(B_aux))
            else:  # stored with the checkpoint (and checked against the seed when it is loaded)
                self.register_buffer(f"A_aux_{i}", A_aux)
                self.register_buffer(f"B_aux_{i}", B_aux)
        self._targets: LiDBTargets | None = None

    # -- layout -------------------------------------------------------------------------------------------------

    def _group(self, name: str) -> str:
        return "{}x{}".format(*self.dims[name])

    def _size(self, group: str) -> int:
        a_l, b_l = map(int, group.split("x"))
        return self.config.rank * (a_l + b_l)

    @staticmethod
    def _flat(A_train: torch.Tensor, B_train: torch.Tensor) -> torch.Tensor:
        """``A_train (…, r, a_l)``, ``B_train (…, b_l, r)`` → ``(…, r·a_l + b_l·r)``."""
        return torch.cat([A_train.flatten(-2), B_train.flatten(-2)], dim=-1)

    def _unflat(self, theta: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a_l, b_l = self.dims[name]
        r = self.config.rank
        return theta[..., : r * a_l].unflatten(-1, (r, a_l)), theta[..., r * a_l:].unflatten(-1, (b_l, r))

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (getattr(self, f"A_aux_{i}"), getattr(self, f"B_aux_{i}")) for i, name in enumerate(self.names)}

    def num_variables(self) -> int:
        """Personalized numbers per subject: ``Σ_l r · (a_l + b_l)``."""
        return num_variables(self.target_shapes, self.config.rank, self.config.a, self.config.b)

    # -- options ------------------------------------------------------------------------------------------------

    # instance properties over the base class's flags (read them from an instance: on the class they are properties)
    @property
    def needs_class_names(self) -> bool:  # the fast fine-tune's prompt is "a sks <class>"
        return self.config.fast_finetune_steps > 0

    @property
    def own_clock(self) -> bool:  # a fine-tuning personalize reports its own seconds per subject
        return self.config.fast_finetune_steps > 0

    # -- forward --------------------------------------------------------------------------------------------------

    def encode(self, references: torch.Tensor) -> torch.Tensor:
        """``(N, k, 3, H, W)`` → image tokens ``(N, T, d_model)``, averaged over the k references."""
        n, k = references.shape[:2]
        return self.token_proj(encode_images(self.encoder, references.flatten(0, 1))).unflatten(0, (n, k)).mean(dim=1)

    def estimates(self, references: torch.Tensor, iterations: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The LiDB estimate after each refinement step: K dicts group → ``(N, L_g, v_g)``."""
        if references.ndim == 4:
            references = references[:, None]
        if references.ndim != 5 or references.shape[2] != 3:
            raise ConfigError(f"references must be (N, k, 3, H, W) images, got shape {tuple(references.shape)}")
        steps = self.config.iterations if iterations is None else iterations
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"iterations={steps!r} (K, the refinement steps) must be at least 1")
        memory = self.encode(references)
        n = memory.shape[0]
        theta = {g: p.unsqueeze(0).expand(n, -1, -1) for g, p in self.theta0.items()}
        out = []
        for _ in range(steps):
            tokens = self.queries.unsqueeze(0).expand(n, -1, -1)
            state = torch.zeros_like(tokens)
            for g, idx in self.group_index.items():
                state = state.index_add(1, torch.tensor(idx, device=tokens.device), self.embed[g](theta[g]))
            h = self.norm(self.decoder(tokens + state, memory))
            theta = {g: theta[g] + self.head[g](h[:, idx]) for g, idx in self.group_index.items()}
            out.append(theta)
        return out

    def to_lora(self, theta: dict[str, torch.Tensor]) -> LoRAWeights:
        """A LiDB estimate (group → ``(N, L_g, v_g)``) → LoRAWeights (``alpha = r``)."""
        variables = {}
        for g, idx in self.group_index.items():
            for j, i in enumerate(idx):
                variables[self.names[i]] = self._unflat(theta[g][:, j], self.names[i])
        ordered = {name: variables[name] for name in self.names}
        return lidb_weights(ordered, self.bases(), float(self.config.rank))

    def forward(self, references: torch.Tensor, iterations: int | None = None) -> LoRAWeights | dict[str, LoRAWeights]:
        """The LoRA of each subject: ``LoRAWeights``, or ``{"unet": …, "text_encoder": …}`` with text targets."""
        return split_components(self.to_lora(self.estimates(references, iterations)[-1]))

    @torch.no_grad()
    def personalize(self, references: torch.Tensor, backbone: Backbone | None = None,
                    class_names: Sequence[str] | None = None) -> LoRAWeights:
        """The hypernetwork's LoRA for each subject; with ``fast_finetune_steps > 0`` each is then fine-tuned on
        its references (rank-relaxed, :func:`fast_finetune`) and ``seconds_per_subject`` records the time of both."""
        if references.ndim == 4:
            references = references[None]
        if backbone is not None:
            self.check_backbone(backbone)
        t0 = time.perf_counter()
        predicted = self(references.to(self.device))
        cfg = self.config
        if cfg.fast_finetune_steps == 0:
            return predicted
        if backbone is None:
            raise ConfigError("the fast fine-tune (fast_finetune_steps > 0) needs the backbone")
        if class_names is None or len(class_names) != references.shape[0]:
            raise ConfigError(f"the fast fine-tune needs the class name of each of the {references.shape[0]} subjects, got {class_names!r}")
        predict_seconds = time.perf_counter() - t0
        parts = predicted if isinstance(predicted, dict) else {"unet": predicted}
        subjects, seconds = [], []
        for i, class_name in enumerate(class_names):
            text = parts["text_encoder"].select(i) if "text_encoder" in parts else None
            with torch.enable_grad():
                weights, spent = fast_finetune(backbone, references[i], class_name, parts["unet"].select(i), steps=cfg.fast_finetune_steps,
                                               rank=cfg.fast_finetune_rank, lr=cfg.fast_finetune_lr, train_predicted=cfg.fast_finetune_predicted,
                                               seed=cfg.fast_finetune_seed, token=cfg.token, text_lora=text)
            subjects.append(weights)
            seconds.append(spent + predict_seconds / len(class_names))
        self.seconds_per_subject = sum(seconds) / len(seconds)
        unet = stack(subjects)
        return unet if "text_encoder" not in parts else {"unet": unet, "text_encoder": parts["text_encoder"]}

    # -- training -------------------------------------------------------------------------------------------------

    def targets(self) -> LiDBTargets:
        """The pre-optimized targets of ``config.targets_path`` (read once)."""
        if self._targets is None:
            cfg = self.config
            self._targets = LiDBTargets(cfg.targets_path, cfg.rank, cfg.a, cfg.b, cfg.basis_seed, self.target_shapes)
        return self._targets

    def target_theta(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The targets of bank rows as estimates (group → ``(n, L_g, v_g)``)."""
        bank = self.targets()
        out = {}
        for g, idx in self.group_index.items():
            names = [self.names[i] for i in idx]
            out[g] = torch.stack([self._flat(bank.A[n][rows], bank.B[n][rows]) for n in names], dim=1)
        return out

    def start_from_targets(self) -> None:
        """Set the first estimate ``θ_0`` to the mean of the pre-optimized targets (a fresh run's start)."""
        bank = self.targets()
        mean = self.target_theta(torch.arange(len(bank)))
        with torch.no_grad():
            for g, value in mean.items():
                self.theta0[g].copy_(value.mean(dim=0))

    @classmethod
    def shapes_for(cls, config, backbone: Backbone) -> dict[str, tuple[int, int]]:
        """The UNet's targets and, with ``text_targets``, the text encoder's (names prefixed ``text_encoder:``)."""
        return all_target_shapes(backbone, config.targets, config.text_targets)

    @classmethod
    def for_backbone(cls, config, backbone: Backbone) -> HyperDreamBooth:
        model = super().for_backbone(config, backbone)
        if config.targets_path:
            model.start_from_targets()
        return model

    def check_training_data(self, data_config, dataset) -> None:
        """With the weight loss on: the data's identities must be the pre-optimized ones — the world's bank
        (``data.identities``, every one with a target) or the same photo folder (same file names, every photo with a
        target); DreamBench-layout folders have no pre-optimization. Without diffusion loss every sample must be a
        bank one."""
        cfg = self.config
        if cfg.weight_loss <= 0:
            return
        targets = self.targets()
        if data_config.kind == "world":
            if not data_config.identities:
                raise ConfigError(f"hypernet.weight_loss={cfg.weight_loss} needs data.identities: the bank `hyperbooth preoptimize` wrote "
                                  f"({len(targets)} identities in {targets.folder})")
            if targets.source != "world":
                raise ConfigError(f"{targets.folder} holds targets of a photo folder, the data are the world's")
            from hyperbooth.world.datasets import bank_identities

            targets.rows(bank_identities(data_config.identities, data_config.identity_start))  # the first missing one is named
            if cfg.diffusion_loss == 0 and data_config.bank_fraction < 1:
                raise ConfigError(f"hypernet.diffusion_loss=0 trains on bank samples only: set data.bank_fraction=1 (got {data_config.bank_fraction})")
        elif data_config.kind == "folder":
            from hyperbooth.train.data import names_digest

            if targets.source != "folder" or targets.digest != names_digest(dataset.photos.files):
                raise ConfigError(f"{targets.folder} was not pre-optimized on the photos of data.path={data_config.path!r} "
                                  "(a photo's index among the sorted file names is its identity)")
            targets.rows(range(len(dataset.photos)))
        else:
            raise ConfigError(f"hypernet.weight_loss={cfg.weight_loss}: `hyperbooth preoptimize` makes targets for the world or a flat folder "
                              f"of photos, not for data.kind={data_config.kind!r}; train with hypernet.weight_loss=0")

    def training_loss(self, batch: TrainBatch, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``diffusion_loss · ‖target − f_{W+ΔW(θ̂_K)}‖²`` (Min-SNR weighted) ``+ weight_loss · mean_k mean ‖θ̂_k − θ*‖²``
        (over the samples whose identity is in the pre-optimized bank; the others add the diffusion term only)."""
        cfg = self.config
        estimates = self.estimates(batch.references)
        loss = torch.zeros((), device=batch.x_t.device)
        scalars: dict[str, torch.Tensor] = {}
        if cfg.diffusion_loss > 0:
            parts = split_components(self.to_lora(estimates[-1]))
            cond = batch.cond
            if isinstance(parts, dict):  # the prompts again, through the predicted text-encoder LoRA
                cond = backbone.encode_prompts(batch.prompts, lora=parts["text_encoder"])
                parts = parts["unet"]
            with backbone.apply_lora(parts, mode="per_sample"):
                pred = backbone.denoise(batch.x_t, batch.t, cond)
            diff = diffusion_loss(pred, batch.target, batch.loss_weights)
            loss = loss + cfg.diffusion_loss * diff
            scalars["diffusion_loss"] = diff
        if cfg.weight_loss > 0:
            if "identity" not in batch.extra:
                raise ConfigError("the weight loss needs each sample's identity: train on the world's data (data.kind: world) with data.identities set")
            in_bank = batch.extra.get("in_bank", torch.ones_like(batch.extra["identity"], dtype=torch.bool)).bool()
            if in_bank.any():
                chosen = in_bank.nonzero().squeeze(1)
                target = {g: v.to(batch.x_t.device) for g, v in self.target_theta(self.targets().rows(batch.extra["identity"][chosen].tolist())).items()}
                per_step = []
                for theta in estimates:
                    sq = sum(((theta[g][chosen] - target[g]) ** 2).sum() for g in theta)
                    per_step.append(sq / (len(chosen) * self.num_variables()))
                wl = torch.stack(per_step).mean()
                loss = loss + cfg.weight_loss * wl
                scalars["weight_loss"] = wl
            else:  # no bank sample here: a zero that still reaches every estimate (backward and DDP need a graph)
                scalars["weight_loss"] = torch.zeros((), device=loss.device)
                loss = loss + 0.0 * sum(theta.sum() for theta in estimates[-1].values())
        return loss, scalars

    # -- files ------------------------------------------------------------------------------------------------

    def load_weights(self, path: Path) -> None:
        super().load_weights(path)
        if self.config.learnable_bases:
            return
        expected = aux_bases(self.target_shapes, self.config.a, self.config.b, self.config.basis_seed)
        for i, name in enumerate(self.names):
            for part, want in zip(("A_aux", "B_aux"), expected[name]):
                stored = getattr(self, f"{part}_{i}")
                if not torch.allclose(stored.float(), want, atol=1e-3):  # 1e-3: a checkpoint saved in fp16 rounds them
                    raise CheckpointError(f"{path}: the frozen LiDB basis {part} of {name!r} does not match basis_seed="
                                          f"{self.config.basis_seed} (the file was not written for this config)")
                stored.copy_(want)  # the exact bases of the seed, whatever precision the file kept


# -- rank-relaxed fast fine-tuning ---------------------------------------------------------------------------------


def fast_finetune(backbone: Backbone, images: torch.Tensor, class_name: str, predicted: LoRAWeights, steps: int = 40, rank: int = 4,
                  lr: float = 1e-3, train_predicted: bool = True, seed: int = 0, token: str = RARE_TOKEN,
                  callback=None, text_lora: LoRAWeights | None = None) -> tuple[LoRAWeights, float]:
    """Rank-relaxed fast fine-tuning of one subject (HyperDreamBooth, Sec. 4.3).

    ``predicted``: the hypernetwork's LoRA (N = 1, rank r). Beside it a rank-``rank`` LoRA (``A`` uniform, ``B = 0``)
    is trained ``steps`` steps with the DreamBooth loss on ``images (k, 3, H, W)`` and the prompt ``"a <token>
    <class>"`` (:func:`hyperbooth.methods.dreambooth_lora.fit`: AdamW at ``lr``, constant, flips); the predicted
    factors train too when ``train_predicted``. Returns the sum as **one** rank-(r + r′) LoRA, exactly (factors
    concatenated), and the seconds it took. ``steps = 0`` returns ``predicted`` itself. ``text_lora``: the subject's
    predicted text-encoder LoRA (N = 1), kept as it is and applied to the prompt while the UNet's LoRA is refined.
    ``callback(step, weights)``: at step 0 and after each step, with the combined LoRA (not timed).
    """
    from hyperbooth.methods.dreambooth_lora import FinetuneConfig, _check_inputs, fit, init_lora, trainable_copy

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"fast fine-tune steps={steps!r} must be an integer >= 0")
    if predicted.num_subjects != 1:
        raise ConfigError(f"the fast fine-tune refines one subject's LoRA, got N={predicted.num_subjects}")
    if steps == 0:
        return predicted, 0.0
    _check_inputs(backbone, images, class_name)
    t0 = time.perf_counter()
    outside = 0.0
    device = backbone.device
    generator = torch.Generator().manual_seed(seed)
    relax = init_lora(predicted.shapes, rank, generator, device=device)
    base = trainable_copy(predicted, device=device, dtype=torch.float32) if train_predicted else predicted.to(device=device, dtype=torch.float32).detach()
    params = [p for layer in relax.values() for p in (layer.A, layer.B)]
    if train_predicted:
        params += [p for layer in base.values() for p in (layer.A, layer.B)]

    def current() -> LoRAWeights:
        return combine([base, relax], [1.0, 1.0])

    text_cond = None
    if text_lora is not None:
        from hyperbooth.prompts import instance_prompt

        with torch.no_grad():
            text_cond = backbone.encode_prompts([instance_prompt(class_name, token)], lora=text_lora.to(device))

    def predict(x_t, t, cond):
        with backbone.apply_lora(current(), mode="shared"):
            return backbone.denoise(x_t, t, text_cond if text_cond is not None else cond)

    def call(step: int) -> None:
        nonlocal outside
        if callback is not None:
            t = time.perf_counter()
            with torch.no_grad():
                callback(step, current().detach())
            outside += time.perf_counter() - t

    cfg = FinetuneConfig(steps=steps, rank=rank, lr=lr, token=token, seed=seed)
    unet = backbone.unet
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)
    try:
        fit(backbone, images, class_name, cfg, params, predict, call, generator)
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(requires_grad[name])
    with torch.no_grad():
        out = current().detach()
    return out, time.perf_counter() - t0 - outside
