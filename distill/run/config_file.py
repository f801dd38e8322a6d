"""Reading a config: the YAML file, the dotted `key=value` overrides, and OmegaConf's refusals as one
`DistillError` line naming the key's path.

OmegaConf merges the file and the overrides into the schema (distill.config.Config), which rejects
unknown keys and values of the wrong type (a choice outside its enum included); building the
dataclasses then runs each section's own checks, and `Config.validate` the whole config's.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, List

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.config import Config, SourceConfig
from distill.errors import DistillError
from distill.sections import Choice


def _field_types(schema: type) -> dict[str, Any]:
    """The resolved type of every field of a dataclass (its annotations are strings here)."""
    return typing.get_type_hints(schema)


def _type_at(path: str) -> Any:
    """The schema type of a dotted config path (list indices allowed), or None when unknown."""
    kind: Any = Config
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part.isdigit():
            kind = typing.get_args(kind)[0] if typing.get_args(kind) else None
        elif dataclasses.is_dataclass(kind):
            kind = _field_types(kind).get(part)
        else:
            return None
    return kind


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    kind = _type_at(key) if key else None
    if isinstance(kind, type) and issubclass(kind, Choice):  # name the choices as they are written
        value = getattr(error, "msg", str(error)).split("'")[1] if "'" in str(error) else "?"
        return f"config key '{key}': '{value}' is not one of {', '.join(choice.value for choice in kind)}"
    message = str(error).splitlines()[0]
    return f"config key '{key}': {message}" if key else f"config: {message}"


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise DistillError(f"override '{text}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        raise DistillError(f"override '{text}': value is not valid YAML ({error.__class__.__name__})")
    return key, value


def load_config(path: str | Path, overrides: List[str] | None = None) -> Config:
    """Read a YAML config, apply dotted `key=value` overrides, validate, and return the typed Config."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise DistillError(f"config file {path} is not a YAML text file: not UTF-8 (byte offset {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise DistillError(f"config file {path} is not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise DistillError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def _check_keys(raw: Any, schema: type, path: str) -> None:
    """Name unknown keys with their full path, list indices included (OmegaConf loses the path
    inside lists of structured configs)."""
    if not isinstance(raw, dict):
        return
    fields = _field_types(schema)
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise DistillError(f"config key '{where}': unknown key (known: {', '.join(fields)})")
        kind = fields[key]
        inner = (typing.get_args(kind) or (None,))[0]
        if dataclasses.is_dataclass(kind):
            _check_keys(value, kind, where)
        elif dataclasses.is_dataclass(inner) and isinstance(value, list):
            for index, item in enumerate(value):
                _check_keys(item, inner, f"{where}[{index}]")
                try:  # type errors, named with the item's path
                    OmegaConf.merge(OmegaConf.structured(inner), OmegaConf.create(item))
                except OmegaConfBaseException as error:
                    error.full_key = f"{where}[{index}].{getattr(error, 'full_key', '') or ''}"
                    raise DistillError(_one_line(error)) from None


def config_from_dict(raw: dict, overrides: List[str] | None = None) -> Config:
    _check_keys(raw, Config, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(raw))
        for text in overrides or []:
            key, value = _parse_override(text)
            OmegaConf.update(merged, key, value, merge=True)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise DistillError(f"config key '{missing[0]}' is required but not set")
        config = _build(merged)
    except OmegaConfBaseException as error:
        raise DistillError(_one_line(error)) from None
    config.validate()
    return config


def _build(merged: Any) -> Config:
    """The dataclasses from the merged config: OmegaConf calls their __init__, so each section checks
    itself on the way. A section inside a list knows its path only up to the index (`data.sources[]`),
    so each list item is built on its own first, and its refusal names the index."""
    for index, source in enumerate(merged.data.sources):
        try:
            OmegaConf.to_object(source)
        except DistillError as error:
            raise DistillError(str(error).replace(SourceConfig.KEY, f"data.sources[{index}]")) from None
    return OmegaConf.to_object(merged)
