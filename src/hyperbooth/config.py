"""Typed configs: dataclasses, one loader (YAML file + ``key=value`` overrides), errors that name the bad value.

    cfg = load_config(BaseTrainConfig, "configs/world_base.yaml", ["train.lr=1e-3", "data.resolution=64"])
    save_config(cfg, out_dir / "config.yaml")   # the resolved config, saved with every checkpoint

Nested dataclasses are addressed with dots. A key that does not exist, a value of the wrong type, or a value a
config's ``validate()`` rejects raises :class:`ConfigError` naming the key, the value and the source.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hyperbooth.errors import ConfigError

T = TypeVar("T")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (int, float, str, bool, Optional, tuple/list, Literal)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}={value!r} is invalid")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}={value!r} must be a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads "1e-3" (no dot) as a string; take it as the number the user meant
            # (only plain decimal/exponent forms: "nan", "inf" or "1_000" stay errors)
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}={value!r} must be a string")
        return value
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}={value!r} must be a mapping")
        return value
    raise ConfigError(f"{source}: {key} has an unsupported type {tp!r}")


def _build(cls: type[T], data: dict, source: str, prefix: str = "") -> T:
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'; {cls.__name__} has: {', '.join(types_)}")
    kwargs = {key: _coerce(value, types_[key], f"{prefix}{key}", source) for key, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return obj


def _set_dotted(data: dict, dotted: str, value: Any, cls, source: str) -> None:
    keys = dotted.split(".")
    node, node_cls = data, cls
    for i, key in enumerate(keys):
        types_ = _field_types(node_cls) if dataclasses.is_dataclass(node_cls) else {}
        if key not in types_:
            raise ConfigError(f"{source}: unknown config key {'.'.join(keys[: i + 1])!r}")
        if i == len(keys) - 1:
            node[key] = value
        else:
            node = node.setdefault(key, {})
            node_cls = types_[key]


def to_dict(cfg: Any) -> dict:
    """A config as plain YAML-able data (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, updated by ``key=value`` overrides (YAML values)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        data = loaded or {}
    base = to_dict(cls())
    merged = _deep_merge(base, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(merged, key.strip(), value, cls, source="override")
    return _build(cls, merged, source=str(path) if path is not None else "config")


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from hyperbooth.files import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def config_from_dict(cls: type[T], data: dict, source: str = "config") -> T:
    """Rebuild a config saved with :func:`save_config` / :func:`to_dict` (e.g. from a checkpoint)."""
    return _build(cls, _deep_merge(to_dict(cls()), data), source)
