"""The LoRA runtime: `LoRAWeights`, per-sample/shared/merged injection, and diffusers/kohya files."""

from hyperbooth.lora.inject import (
    DEFAULT_TEXT_ENCODER_TARGETS,
    DEFAULT_UNET_TARGETS,
    LoRAInjector,
    apply_lora,
    check_compatible,
    find_targets,
    target_shapes,
)
from hyperbooth.lora.io import FORMATS, LoRAFile, load_lora, save_lora
from hyperbooth.lora.weights import LoRALayer, LoRAWeights, combine, frobenius_sq, stack

__all__ = [
    "DEFAULT_TEXT_ENCODER_TARGETS",
    "DEFAULT_UNET_TARGETS",
    "FORMATS",
    "LoRAFile",
    "LoRAInjector",
    "LoRALayer",
    "LoRAWeights",
    "apply_lora",
    "check_compatible",
    "combine",
    "find_targets",
    "frobenius_sq",
    "load_lora",
    "save_lora",
    "stack",
    "target_shapes",
]
