"""Typed YAML configs: nested dataclasses filled from YAML with one clear error per bad key.

A config is a dataclass whose fields have defaults and type hints (``int``, ``float``, ``str``, ``bool``,
``list[T]``, ``dict[str, T]``, ``T | None`` and nested dataclasses; a ``float`` field also takes ``1e-4``, which
PyYAML reads as a string). :func:`load_config` reads a YAML file, applies
``a.b.c=VALUE`` overrides (VALUE parsed as YAML, as a command line's ``--set`` gives them), checks every key and
type, builds the dataclasses and calls each one's ``validate()`` method if it has one::

    @dataclass
    class Train:
        steps: int = 1000
        lr: float = 0.1

        def validate(self) -> None:
            if self.steps < 1:
                raise ValueError("steps must be >= 1")

    @dataclass
    class Config:
        train: Train = field(default_factory=Train)

    cfg = yaml_config.load_config(Config, "run.yaml", ["train.lr=0.05"])

Every problem is a :class:`ConfigError` (a ``ValueError``) that names the file and the dotted key, e.g.
``run.yaml: unknown key 'train.stepz' (did you mean 'steps'?)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Sequence, TypeVar

import yaml

__all__ = ["ConfigError", "config_from_dict", "apply_overrides", "load_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not validate; the message names the key."""


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: only 'T | None' unions are supported in configs, got {tp}")
        return _check(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_check(k, kt, f"{where} key"): _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and type(value) is tp:
        return value
    name = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(tp, str(tp))
    raise ConfigError(f"{where}: expected {name}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {path!r}{hint}")
        kwargs[key] = _check(value, hints[key], path)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return obj


def config_from_dict(cls: type[T], raw: Any, source: str = "config") -> T:
    """Build the dataclass ``cls`` from a nested dict, checking keys and types, then ``validate()`` each part.

    Raises:
        ConfigError: naming ``source`` and the dotted key of the first problem.
    """
    try:
        return _build(cls, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=VALUE`` items (VALUE parsed as YAML) in the nested dict ``raw`` (in place; returned)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"an override must look like SECTION.KEY=VALUE (e.g. train.steps=500), got {item!r}")
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        try:
            node[last] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return raw


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> T:
    """Read the YAML file ``path`` (None: all defaults), apply ``overrides``, and build ``cls`` from it."""
    raw: Any = {}
    source = "config"
    if path is not None:
        source = os.fspath(path)
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        apply_overrides(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config_from_dict(cls, raw, source)

