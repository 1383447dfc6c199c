"""Configs are dataclasses loaded from YAML, then adjusted by `key=value` command-line overrides.

A config class is a plain (possibly nested, possibly frozen) dataclass with type annotations.
`load_config` reads a YAML mapping into it, checking every key against the dataclass fields and
coercing every value to the annotated type (int, float, bool, str, Path, Optional/Union,
Literal, list, tuple, dict, nested dataclass); then it applies overrides such as `lr=3e-4`,
`model.dim=64` or `sizes=[1,2]`, whose values are parsed with `yaml.safe_load`.
Any unknown key is an error that names the key and where it came from (the file or
"command line"), so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

C = TypeVar("C")

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config file or override that does not fit its config dataclass."""


def load_config(config_cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build `config_cls` from an optional YAML file, then apply `key=value` overrides in order.

    Nested fields are addressed with dots (`model.dim=64`). Fields the YAML file leaves out keep
    their dataclass defaults; a required field missing everywhere is an error naming it.
    """
    data: dict = {}
    source = COMMAND_LINE
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source} must hold a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    config = config_from_mapping(config_cls, data, source=source)
    for override in overrides:
        config = apply_override(config, override)
    return config


def config_from_mapping(config_cls: type[C], data: dict, *, source: str = "mapping", prefix: str = "") -> C:
    """Build a dataclass from a (nested) mapping, coercing values to the annotated field types.

    `source` and `prefix` only make error messages precise (`model.dim` in `configs/x.yaml`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(prefix, source)}: expected a mapping for {config_cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + str(unknown[0])!r} in {source} "
            f"({config_cls.__name__} has: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, source)
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ConfigError(f"required config key {prefix + name!r} is missing in {source}")
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{_where(prefix.rstrip('.'), source)}: {err}") from err


def apply_override(config: C, override: str) -> C:
    """Return a copy of `config` with one `a.b=value` override applied (value parsed as YAML).

    When the parsed value does not fit but the field takes a string, the raw text is used, so
    `name=007` gives "007" rather than failing on the integer 7.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} on the {COMMAND_LINE} is not of the form key=value")
    return _override(config, key.split("."), raw, key)


def config_to_yaml(config: Any) -> str:
    """The config as YAML text that `load_config` reads back to an equal config."""
    return yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False)


def _override(config: Any, keys: list[str], raw: str, full_key: str) -> Any:
    """Set `keys` (a dotted path split) inside `config`, rebuilding each level with `replace`."""
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"unknown config key {full_key!r} on the {COMMAND_LINE}: "
                          f"{type(config).__name__} value has no fields")
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config) if f.init}
    name = keys[0]
    if name not in names:
        raise ConfigError(f"unknown config key {full_key!r} on the {COMMAND_LINE} "
                          f"({type(config).__name__} has: {', '.join(sorted(names))})")
    if len(keys) > 1:
        value = _override(getattr(config, name), keys[1:], raw, full_key)
    else:
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as err:
            raise ConfigError(f"override {full_key}={raw!r} on the {COMMAND_LINE}: not valid YAML ({err})") from err
        try:
            value = _coerce(parsed, hints[name], full_key, COMMAND_LINE)
        except ConfigError:
            if not _accepts_str(hints[name]):
                raise
            value = _coerce(raw, hints[name], full_key, COMMAND_LINE)
    try:
        return dataclasses.replace(config, **{name: value})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"override {full_key} on the {COMMAND_LINE}: {err}") from err


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert a YAML value to the type `hint` of field `key`, or raise naming key and source."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{_where(key, source)}: {value!r} fits none of {hint} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{_where(key, source)}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint):
        return config_from_mapping(hint, value, source=source, prefix=key + ".")
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key, source)}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(key, source)}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return (origin or hint)(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, source)}: expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {_coerce(k, key_type, key, source): _coerce(v, value_type, f"{key}.{k}", source)
                for k, v in value.items()}
    return _coerce_scalar(value, hint, key, source)


def _coerce_scalar(value: Any, hint: Any, key: str, source: str) -> Any:
    """Scalars: bool is strict, int accepts integral floats, float accepts ints, str/Path."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    type_name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{_where(key, source)}: expected {type_name}, got {value!r}")


def _accepts_str(hint: Any) -> bool:
    """Whether a field annotated `hint` takes a plain string (str, Path, Optional[str], ...)."""
    if hint in (str, Path):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(hint))
    return False


def _where(key: str, source: str) -> str:
    """'config key 'a.b' in file.yaml' for error messages."""
    return f"config key {key!r} in {source}" if key else source


def _plain(value: Any) -> Any:
    """Tuples to lists and Paths to strings, so `yaml.safe_dump` can write the value."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
