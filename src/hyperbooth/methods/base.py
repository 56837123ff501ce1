"""The Personalizer interface: reference images of subjects → a LoRA per subject, and the registry of methods.

A method is one module with a :class:`Personalizer` subclass decorated with :func:`register`:

    @register
    class MyHyperNetwork(Personalizer):
        method = "mine"
        config_class = MyConfig          # a dataclass with validate(); saved with the weights

        def forward(self, references):  # (N, k, 3, H, W) in [-1, 1] → LoRAWeights with N subjects
            ...
        def training_loss(self, batch, backbone):   # trainable methods: (loss, {name: scalar})
            ...

Then ``hyperbooth train`` trains it (``method: mine`` in the config), ``hyperbooth.methods.load(folder)`` loads it,
and ``personalize`` / ``generate`` / the evaluation harness run it, with no other file changed.

Files (``save_pretrained`` / ``from_pretrained``, diffusers' convention): ``hypernet_config.json`` holds the method's
name, its config, the backbone's target shapes and extra fields (the training config); ``hypernet.safetensors`` the
weights (frozen pre-trained encoders are not stored: they load from their own folders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hyperbooth.backbones.base import Backbone, Conditioning
from hyperbooth.config import config_from_dict
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.files import atomic_write, files_digest
from hyperbooth.lora.weights import LoRAWeights

WEIGHTS_NAME = "hypernet.safetensors"
CONFIG_NAME = "hypernet_config.json"

#: method name → class; filled by :func:`register`
METHODS: dict[str, type[Personalizer]] = {}


@dataclass
class TrainBatch:
    """One training batch as a method's loss sees it, with the diffusion forward process already applied (by the
    engine, :mod:`hyperbooth.train.engine`).

    ``references (N, k, 3, H, W)`` images of each sample's subject in [-1, 1]; ``x0 (N, C, h, w)`` the target image
    in the denoiser's space (``backbone.to_model``); ``noise (N, C, h, w)`` ε, ``t (N,)`` the timesteps,
    ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε``; ``target`` what the denoiser should predict (ε, v or x0, by the
    backbone's ``prediction_type``); ``cond`` the conditioning of ``prompts``; ``loss_weights (N,)`` Min-SNR-γ
    weights (ones when off); ``prompts`` the texts ``cond`` encodes (after condition dropout: ``""`` for a dropped
    one); ``class_names`` the subjects' classes (None where unknown).
    """

    references: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    cond: Conditioning
    loss_weights: torch.Tensor
    prompts: list[str]
    class_names: list[str | None]
    #: what a method's data add to each sample beyond the fields above (e.g. pre-optimized LoRA targets), by name
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class Personalizer(nn.Module):
    """references ``(N, k, 3, H, W)`` → :class:`~hyperbooth.lora.weights.LoRAWeights` with N subjects.

    Subclasses set ``method`` and ``config_class`` and implement ``forward`` (and ``training_loss`` if trainable).
    ``target_shapes``: UNet module name → ``(d_in, d_out)``, what the LoRA must fit.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: whether ``hyperbooth train`` can train it (a hypernetwork); a per-subject fine-tune is not trained ahead
    trainable: ClassVar[bool] = True
    #: whether ``personalize`` needs the subjects' class names (a fine-tune's prompt "a sks <class>")
    needs_class_names: ClassVar[bool] = False
    #: whether the method keeps its own clock: ``personalize`` sets ``seconds_per_subject`` (the mean seconds per subject
    #: of its last call, e.g. a fine-tune's training time, also for results it read back from a cache); harnesses then
    #: report that instead of timing the call
    own_clock: ClassVar[bool] = False

    def __init__(self, config, target_shapes: dict[str, tuple[int, int]]):
        super().__init__()
        if hasattr(config, "validate"):
            config.validate()
        self.config = config
        self.target_shapes = {name: (int(a), int(b)) for name, (a, b) in target_shapes.items()}
        self.seconds_per_subject = float("nan")  # set by ``personalize`` of methods with ``own_clock``

    # -- building --------------------------------------------------------------------------------------------

    @classmethod
    def targets_of(cls, config) -> tuple[str, ...] | None:
        """The UNet target patterns the config names (``config.targets``), or None for the backbone's default."""
        return tuple(getattr(config, "targets", ())) or None

    @classmethod
    def shapes_for(cls, config, backbone: Backbone) -> dict[str, tuple[int, int]]:
        """Target name → ``(d_in, d_out)`` of what a personalizer of ``config`` emits for ``backbone`` (default: the
        UNet targets the config names; a method with text-encoder targets adds them)."""
        return backbone.target_shapes(cls.targets_of(config))

    @classmethod
    def for_backbone(cls, config, backbone: Backbone) -> Personalizer:
        """A new (untrained) instance that emits LoRAs for ``backbone``'s target modules."""
        return cls(config, cls.shapes_for(config, backbone))

    def check_backbone(self, backbone: Backbone, source: str | os.PathLike | None = None) -> None:
        """A clear error when this personalizer was built for another backbone (target names or shapes differ).
        The last denoiser that passed is remembered, so personalizing many subjects checks once."""
        checked = getattr(self, "_checked", None)  # a weak reference: the personalizer must not hold the denoiser
        if checked is not None and checked() is backbone.unet:
            return
        where = f" {source}" if source else ""
        try:
            wanted = self.shapes_for(self.config, backbone)
        except ConfigError as e:
            raise CheckpointError(f"the {self.method} personalizer{where} was built for another backbone than {backbone.path} ({e})") from None
        if wanted != self.target_shapes:
            diff = sorted(set(wanted.items()) ^ set(self.target_shapes.items()))[0]
            raise CheckpointError(f"the {self.method} personalizer{where} was built for another backbone than {backbone.path} "
                                  f"(first target that differs: {diff[0]!r})")
        self._checked = weakref.ref(backbone.unet)

    # -- use -------------------------------------------------------------------------------------------------

    def with_options(self, **options) -> Personalizer:
        """Change settings that may differ from training (the config class's ``INFERENCE_OPTIONS``, e.g.
        HyperDreamBooth's refinement steps) in place, validated; any other setting is refused, naming it."""
        if not options:
            return self
        allowed = getattr(self.config_class, "INFERENCE_OPTIONS", ())
        if not allowed:
            raise ConfigError(f"method {self.method!r} has no inference option {sorted(options)[0]!r}")
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ConfigError(f"{unknown[0]!r} is not an inference option of {self.method} (options: {', '.join(allowed)})")
        config = dataclasses.replace(self.config, **options)
        config.validate()
        self.config = config
        return self

    @abstractmethod
    def forward(self, references: torch.Tensor) -> LoRAWeights: ...

    @torch.no_grad()
    def personalize(self, references: torch.Tensor, backbone: Backbone | None = None,
                    class_names: Sequence[str] | None = None) -> LoRAWeights:
        """references ``(N, k, 3, H, W)`` (or ``(k, 3, H, W)`` for one subject) → LoRAWeights with N subjects,
        checked against ``backbone`` when one is given. ``class_names``: the subjects' classes (methods with
        ``needs_class_names``)."""
        if references.ndim == 4:
            references = references[None]
        if backbone is not None:
            self.check_backbone(backbone)
        return self(references.to(self.device))

    def subject_metadata(self, index: int = 0) -> dict[str, str]:
        """LoRA-file header entries for subject ``index`` of the last ``personalize`` call (e.g. HyperLoRA's
        coefficients, which let ``--mix`` interpolate in its own space); default none."""
        return {}

    def check_training_data(self, data_config, dataset) -> None:
        """Called by ``hyperbooth train`` before the first step with the run's data config and dataset: a method
        whose loss needs something of its data (e.g. pre-optimized targets for its identities) refuses a mismatch
        here, naming it, instead of failing or silently doing nothing mid-run. Default: no requirement."""

    def training_loss(self, batch: TrainBatch, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise for one batch and the scalars to log (trainable methods)."""
        raise ConfigError(f"method {self.method!r} is not trained by `hyperbooth train`")

    @property
    def device(self) -> torch.device:
        """Where the parameters are (the CPU for a method without any)."""
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    # -- files -----------------------------------------------------------------------------------------------

    def state_to_save(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes: the state dict (or ``state``, this model's full state gathered from
        shards), less a frozen pre-trained ``encoder`` (it loads from its own folder)."""
        state = self.state_dict() if state is None else state
        encoder = getattr(self, "encoder", None)
        if encoder is None or getattr(encoder, "trainable", True):
            return dict(state)
        return {k: v for k, v in state.items() if not k.startswith("encoder.")}

    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None, dtype: torch.dtype | None = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        """``hypernet_config.json`` (method, config, target shapes, ``extra``) + ``hypernet.safetensors``. ``dtype``
        (e.g. ``torch.float16``) stores floating-point weights in that type; loading casts them back. ``state``: the
        weights to write instead of this module's own (the training engine's, gathered from FSDP shards)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_to_save(state).items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            overflow = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
            if overflow is not None:
                raise CheckpointError(f"{overflow} does not fit in {dtype} (values overflow to inf); save in full precision instead")
        folder.mkdir(parents=True, exist_ok=True)
        if state:  # a method with nothing learned ahead (a fine-tune) keeps only its config
            atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"hyperbooth.method": self.method}))
        meta = {"method": self.method, "config": asdict(self.config), "target_shapes": self.target_shapes, **(extra or {})}
        atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        return folder

    def load_weights(self, path: Path) -> None:
        """Load ``hypernet.safetensors`` into this model; a missing, damaged or mismatched file is named."""
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is missing or damaged ({type(e).__name__})") from None
        expected = self.state_to_save()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or bad_shape:
            raise CheckpointError(f"{path} does not match its config (first mismatch: {(missing or unexpected or bad_shape)[0]!r})")
        self.load_state_dict(state, strict=False)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Personalizer:
        folder = Path(folder)
        meta = read_config(folder)
        if meta["method"] != cls.method:
            raise CheckpointError(f"{folder / CONFIG_NAME} holds a {meta['method']!r} personalizer, not {cls.method!r}")
        config = config_from_dict(cls.config_class, meta.get("config") or {}, source=str(folder / CONFIG_NAME))
        model = cls(config, {k: tuple(v) for k, v in meta.get("target_shapes", {}).items()})
        if model.state_to_save():
            model.load_weights(folder / WEIGHTS_NAME)
        return model.eval()


# -- registry -----------------------------------------------------------------------------------------------------


def register(cls: type[Personalizer]) -> type[Personalizer]:
    """Class decorator: make ``cls`` available under ``cls.method`` to ``load``, ``get`` and ``hyperbooth train``."""
    if not cls.method:
        raise ConfigError(f"{cls.__name__} must set a method name")
    if cls.method in METHODS and METHODS[cls.method] is not cls:
        raise ConfigError(f"method {cls.method!r} is already registered by {METHODS[cls.method].__name__}")
    if not (isinstance(cls.config_class, type) and fields(cls.config_class)):
        raise ConfigError(f"{cls.__name__}.config_class must be a dataclass")
    METHODS[cls.method] = cls
    return cls


def get(name: str, what: str = "method") -> type[Personalizer]:
    """The class registered as ``name``; an unknown name lists the registered ones."""
    if name not in METHODS:
        raise ConfigError(f"{what} {name!r} is not a registered method; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def read_config(folder: str | os.PathLike) -> dict:
    """``hypernet_config.json`` of a personalizer folder, with its ``method``; errors name the folder."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"personalizer folder {str(folder)!r} does not exist; train one with `hyperbooth train --config configs/e2e_world.yaml`")
    if not path.is_file():
        if (folder / "hyper_lora_modules.json").is_file():  # a released HyperLoRA model folder (ComfyUI's layout)
            raise CheckpointError(f"{folder} is a released HyperLoRA model folder, not a hyperbooth one; convert it with "
                                  f"`hyperbooth import-hyperlora {folder} --image-encoder CLIP_FOLDER --out FOLDER`")
        raise CheckpointError(f"{folder} is not a hypernetwork folder ({CONFIG_NAME} is missing)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise CheckpointError(f"{path} does not name its method")
    return meta


def weights_digest(folder: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of a personalizer folder's weights file (of its config for a method that
    keeps no weights): what LoRA files and result tables record, so a model retrained into the same folder is told
    apart."""
    folder = Path(folder)
    weights = folder / WEIGHTS_NAME
    return files_digest([weights if weights.is_file() else folder / CONFIG_NAME])


def load(folder: str | os.PathLike) -> Personalizer:
    """The personalizer saved in ``folder``, of the class its config names."""
    meta = read_config(folder)
    cls = get(meta["method"], what=f"{Path(folder) / CONFIG_NAME}: method")
    return cls.from_pretrained(folder)
