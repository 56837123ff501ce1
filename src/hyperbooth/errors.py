"""Errors hyperbooth raises on bad input.

Every error names the offending file, key or value. The CLI turns a :class:`HyperboothError` into one line on
stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""


class HyperboothError(Exception):
    """Base class of the errors that bad input (files, configs, arguments) raises."""


class ConfigError(HyperboothError, ValueError):
    """A configuration value or CLI argument is invalid; the message names it."""


class LoRAFileError(HyperboothError):
    """A LoRA file cannot be read, is not safetensors, or does not match the model; the message names the file/key."""


class ImageLoadError(HyperboothError):
    """An image file is missing, corrupt, truncated or not an image; the message names the file."""


class CheckpointError(HyperboothError):
    """A model or hypernetwork checkpoint is missing, damaged or of another kind; the message says how to fix it."""
