"""Device and dtype names from configs and the command line, parsed in one place."""

from __future__ import annotations

import torch

from hyperbooth.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:1"``, ``"mps"`` …; an unknown name or an
    unavailable CUDA device is a :class:`ConfigError` naming ``what``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what} {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, what: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]
