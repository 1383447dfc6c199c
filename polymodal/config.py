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

from polymodal.errors import ConfigError

C = TypeVar("C")

COMMAND_LINE = "command line"


def load_config(config_cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build `config_cls` from an optional YAML file, then apply `key=value` overrides in order.

    Nested fields are addressed with dots (`model.dim=64`). Fields set nowhere keep their
    dataclass defaults; a required field missing from both file and overrides is an error.
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
    for override in overrides:
        _set_override(data, config_cls, override)
    return config_from_mapping(config_cls, data, source=source)


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


def config_to_yaml(config: Any) -> str:
    """The config as YAML text that `load_config` reads back to an equal config."""
    return yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False)


def _set_override(data: dict, config_cls: type, override: str) -> None:
    """Write one `a.b=value` override into the nested mapping `data`, checked and coerced.

    The value is parsed as YAML and coerced to the field's type right away, so errors name the
    command line. When the parsed value does not fit but the field takes a string, the raw text
    is used: `name=007` gives "007" rather than failing on the integer 7.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} on the {COMMAND_LINE} is not of the form key=value")
    names = key.split(".")
    node, cls = data, config_cls
    for depth, name in enumerate(names):
        fields = {f.name for f in dataclasses.fields(cls) if f.init} if cls is not None else set()
        if name not in fields:
            known = f" ({cls.__name__} has: {', '.join(sorted(fields))})" if cls is not None else ""
            raise ConfigError(f"unknown config key {key!r} on the {COMMAND_LINE}{known}")
        hint = typing.get_type_hints(cls)[name]
        if depth == len(names) - 1:
            node[name] = _parse_override(raw, hint, key)
            return
        child = node.get(name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            child = dataclasses.asdict(child)
        node[name] = child if isinstance(child, dict) else {}
        node, cls = node[name], _dataclass_in(hint)


def _parse_override(raw: str, hint: Any, key: str) -> Any:
    """The YAML value of an override's text, coerced to `hint` (raw text for string fields)."""
    try:
        parsed = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}={raw!r} on the {COMMAND_LINE}: not valid YAML ({err})") from err
    try:
        return _coerce(parsed, hint, key, COMMAND_LINE)
    except ConfigError:
        if not _accepts_str(hint):
            raise
        return _coerce(raw, hint, key, COMMAND_LINE)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (also inside Optional[...]), or None for a plain value."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


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
        if isinstance(value, hint):
            return value
        return config_from_mapping(hint, value, source=source, prefix=key + ".")
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key, source)}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(key, source)}: expected {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in pairs)
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
