"""Reading config files, dotted overrides, and turning validation errors into one clear line.

The pieces :class:`~Ava.config.training_config.EnhancedTrainingConfig` is loaded with; this module
knows no schema (the schema class is passed in), so the config module imports it and not the
other way round. A user error never surfaces as a pydantic traceback: each problem becomes
``key: what is wrong (got X); fix`` and all problems of one config are reported together, on one
line, in an :class:`~Ava.errors.AvaConfigError`.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import AvaConfigError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (``{}`` for an empty file).

    Args:
        path: the YAML file.

    Returns:
        The parsed sections, not yet validated.

    Raises:
        AvaConfigError: a missing file, invalid YAML (with line and column), a file that is not
            UTF-8, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise AvaConfigError(f"config file not found: {path}; pass the path of a YAML file such as configs/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise AvaConfigError(f"{path}:{where}: invalid YAML ({problem}); fix the syntax there") from err
    except UnicodeDecodeError as err:
        raise AvaConfigError(f"{path}: not a UTF-8 text file; save the config as UTF-8 YAML") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AvaConfigError(
            f"{path}: the top level must be a mapping of sections (model:, training:, ...), got {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> frozenset[str]:
    """Apply each ``a.b.c=value`` of ``overrides`` to ``data`` in place (see :func:`apply_override`).

    Returns:
        The dotted keys the overrides set (a problem at one of them is said to come from the
        command line).
    """
    overrides = list(overrides)
    for override in overrides:
        apply_override(data, override)
    return frozenset(o.partition("=")[0].strip() for o in overrides)


def validation_problems(err: ValidationError, schema: type[BaseModel],
                        overridden: Iterable[str] = ()) -> list[str]:
    """One readable line per error of a failed validation against ``schema``.

    Args:
        err: what ``schema.model_validate`` raised.
        schema: the root model (unknown keys are matched against its sections' keys).
        overridden: dotted keys set by command-line overrides; a problem at such a key says it
            came from the command line.

    Returns:
        ``key: what is wrong (got X); fix`` per error, in pydantic's order.
    """
    overridden = list(overridden)
    problems = []
    for error in err.errors():
        key = ".".join(str(p) for p in error.get("loc", ()))
        from_cli = any(key == o or key.startswith(o + ".")  # an unknown section the override created:
                       or (error["type"] == "extra_forbidden" and o.startswith(key + "."))
                       for o in overridden)
        problems.append(_describe(error, schema) + (" (from the command-line override)" if from_cli else ""))
    return problems


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place (list items by index: ``data.sources.0.path``).

    The value is parsed as YAML (``3``, ``true``, ``null``, ``[0.9, 0.99]``); pydantic then
    coerces it to the field's type.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise AvaConfigError(f"override '{override}' is not key=value; write e.g. training.learning_rate=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, here)
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise AvaConfigError(f"override '{override}': {here} is a value, not a section; drop the rest of the key")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, key)  # validates the index
        node[int(last)] = value
    else:
        node[last] = value


def _list_item(items: list[Any], part: str, key: str) -> Any:
    if not part.isdigit() or int(part) >= len(items):
        raise AvaConfigError(f"override key {key}: '{part}' is not an index of a list of {len(items)} items")
    return items[int(part)]


# --------------------------------------------------------------------------------------------
# error messages
# --------------------------------------------------------------------------------------------


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    loc = tuple(error.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        parent = _section_at(schema, loc[:-1])
        valid = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        prefix = ".".join(str(p) for p in loc[:-1])
        if close:
            return f"unknown key '{key}'; did you mean '{_join(prefix, close[0])}'?"
        where = f"'{prefix}'" if prefix else "the top level"
        return f"unknown key '{key}'; valid keys in {where}: {', '.join(valid)}"
    message = error.get("msg", "invalid value")
    message = message.removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"'{key}' is required; add it"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{key}: {message[0].lower() + message[1:]}{shown}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _section_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that sits at ``loc`` inside ``schema``."""
    cls: type[BaseModel] | None = schema
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int):
            continue  # list index: the item type was found with the list field
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = _model_in(field.annotation)
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
