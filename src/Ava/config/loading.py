"""Reading config files, dotted overrides, and turning validation errors into one clear line.

The pieces :class:`~Ava.config.training_config.EnhancedTrainingConfig` is loaded with; this module
holds no schema (where it needs one, to find a field's type or default, the schema class is passed
in), so the config module imports it and not the other way round. A user error never surfaces as a
pydantic traceback: each problem becomes ``key: what is wrong (got X); fix`` and all problems of
one config are reported together, on one line, in an :class:`~Ava.errors.AvaConfigError`.

How values are read (the same in files and in ``key=value`` overrides):

* Numbers follow YAML 1.2: ``3e-4`` and ``1.0e8`` are floats, ``0123`` is the integer 123 and
  ``1:30`` is text (PyYAML's YAML 1.1 reads them as text, octal 83 and 90); ``1_000`` is 1000.
  ``yes``/``no``/``on``/``off``/``true``/``false`` are booleans.
* Nothing is converted between booleans, numbers and text: ``max_steps: yes`` or
  ``learning_rate: "3e-4"`` is an error naming the key and the value as written, and so is
  ``name: 123`` for a text key (quote it: ``name: "123"``). An integer is accepted where a float
  is expected (``learning_rate: 1``).
* On the command line everything is text, so an override of a text key keeps the value exactly as
  typed (``run.name=0123`` is the name ``0123``); overrides of other keys are parsed as YAML.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import AvaConfigError

# --------------------------------------------------------------------------------------------
# YAML with YAML 1.2 numbers
# --------------------------------------------------------------------------------------------

_DIGITS = r"[0-9](?:_?[0-9])*"
_INT = re.compile(rf"^(?:[-+]?{_DIGITS}|[-+]?0x[0-9a-fA-F]+|[-+]?0o[0-7]+)$")
_FLOAT = re.compile(
    rf"^(?:[-+]?(?:{_DIGITS}\.(?:{_DIGITS})?|\.{_DIGITS})(?:[eE][-+]?[0-9]+)?"
    rf"|[-+]?{_DIGITS}[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers (see the module docstring)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    return int(text, 0) if text.lstrip("+-")[:2].lower() in ("0x", "0o") else int(text, 10)


_ConfigLoader.add_constructor(_INT_TAG, _construct_int)


class _ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that also quotes text a YAML 1.2 reader would take for a number
    (``'1e3'``), so a written config reads back the same under both rules."""


_ConfigDumper.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_ConfigDumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def dump_yaml(data: Any) -> str:
    """``data`` as block-style YAML (keys in order, short lists inline) that :func:`read_config_file`
    and ``yaml.safe_load`` both read back unchanged."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=None, allow_unicode=False)


def load_yaml(text: str) -> Any:
    """A YAML document read as Ava reads configs (YAML 1.2 numbers: ``1e-05`` is a float, not text)."""
    return _parse_yaml(text)[0]


def _parse_yaml(text: str) -> tuple[Any, dict[str, str]]:
    """The value of a YAML document, and each scalar's text as written by dotted key."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        return loader.construct_document(node), _scalar_texts(node)
    finally:
        loader.dispose()


def _scalar_texts(node: yaml.Node, prefix: str = "", seen: frozenset[int] = frozenset()) -> dict[str, str]:
    """Dotted key → the scalar's source text (with its quotes, if it was quoted)."""
    if id(node) in seen:  # a recursive alias
        return {}
    seen = seen | {id(node)}
    if isinstance(node, yaml.ScalarNode):
        quote = node.style if node.style in ("'", '"') else ""
        return {prefix: f"{quote}{node.value}{quote}"}
    texts: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                texts.update(_scalar_texts(value, _join(prefix, key.value), seen))
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            texts.update(_scalar_texts(value, _join(prefix, str(index)), seen))
    return texts


# --------------------------------------------------------------------------------------------
# files and overrides
# --------------------------------------------------------------------------------------------


def read_config_file(path: str | Path, written: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """The top-level mapping of a YAML config file.

    Args:
        path: the YAML file.
        written: when given, filled with each scalar's text as it is written in the file, by
            dotted key (``training.max_steps`` → ``yes``), for error messages.

    Returns:
        The parsed sections, not yet validated.

    Raises:
        AvaConfigError: a missing file, invalid YAML (with line and column), a file that is not
            UTF-8, a top level that is not a mapping, or a file that holds no settings at all.
    """
    path = Path(path)
    if not path.is_file():
        raise AvaConfigError(f"config file not found: {path}; pass the path of a YAML file such as configs/tiny.yaml")
    try:
        data, texts = _parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise AvaConfigError(f"{path}:{where}: invalid YAML ({problem}); fix the syntax there") from err
    except UnicodeDecodeError as err:
        raise AvaConfigError(f"{path}: not a UTF-8 text file; save the config as UTF-8 YAML") from err
    if not isinstance(data, dict):
        if data is None:
            raise AvaConfigError(f"{path}: the file holds no settings; is it the right file? A config sets "
                                 "sections such as model: and training: (see configs/tiny.yaml)")
        raise AvaConfigError(f"{path}: the top level must be a mapping of sections (model:, training:, ...), "
                             f"got {_kind_of(data)}; is it the right file?")
    if not data:
        raise AvaConfigError(f"{path}: the file holds no settings ({{}}); is it the right file? A config sets "
                             "sections such as model: and training: (see configs/tiny.yaml)")
    if written is not None:
        written.update(texts)
    return data


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, str):
        return f"the text {_clip(value)!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"a {type(value).__name__}"


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], *, schema: type[BaseModel] | None = None,
                    written: MutableMapping[str, str] | None = None) -> frozenset[str]:
    """Apply each ``a.b.c=value`` of ``overrides`` to ``data`` in place (see :func:`apply_override`).

    Args:
        data: the sections read from the config file.
        overrides: ``dotted.key=value`` strings.
        schema: the root model, to find each key's type and each list's default.
        written: when given, updated with each overridden value as typed.

    Returns:
        The dotted keys the overrides set (a problem at one of them is said to come from the
        command line).
    """
    overrides = list(overrides)
    for override in overrides:
        apply_override(data, override, schema=schema, written=written)
    return frozenset(o.partition("=")[0].strip() for o in overrides)


def apply_override(data: dict[str, Any], override: str, *, schema: type[BaseModel] | None = None,
                   written: MutableMapping[str, str] | None = None) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place.

    The value is parsed as YAML (``3``, ``true``, ``null``, ``[0.9, 0.99]``, numbers as in YAML
    1.2), except that a bare number, boolean or date given to a text key (known from ``schema``)
    stays the text as typed: on the command line everything is text. Nothing else is converted;
    validation rejects a value of the wrong kind.

    List items are picked by index: ``data.sources.0.path=a.txt`` sets ``path`` of the first
    source; an index equal to the list's length adds an item (so the same override also works
    when the config has no sources yet). A list the file does not set starts from the schema's
    default.

    Args:
        data: the sections, changed in place.
        override: ``dotted.key=value``.
        schema: the root model (optional): to keep text for text keys and to start a list the
            file does not set from its default.
        written: when given, updated with the value as typed, by dotted key.

    Raises:
        AvaConfigError: not ``key=value``, an index that is not one (or past the end of the
            list), an index into a section, or a key into a value.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise AvaConfigError(f"override '{override}' is not key=value; write e.g. training.learning_rate=3e-4")
    text = raw.strip()
    try:
        value, texts = _parse_yaml(text) if text else (None, {})
    except yaml.YAMLError:
        value, texts = text, {}
    texts[""] = text
    annotation = _annotation_at(schema, parts) if schema is not None else None
    if text and _accepts_text(annotation) and isinstance(value, (bool, int, float, datetime.date)):
        value = text  # a text key: `run.name=0123` is the name 0123, not the number 123
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, here, override)
            if index == len(node):
                node.append(None)
            if node[index] is None:
                node[index] = [] if parts[depth + 1].isdigit() else {}
            node = node[index]
            if not isinstance(node, (dict, list)):
                raise AvaConfigError(f"override '{override}': {here} is a value, not a section; "
                                     "drop the rest of the key")
        else:
            node = _section_child(node, parts, depth, override, schema)
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(node, last, key, override)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    else:
        if last.isdigit():
            _not_a_list(".".join(parts[:-1]), override)
        node[last] = value
    if written is not None:
        for stale in [k for k in written if k == key or k.startswith(key + ".")]:
            del written[stale]
        written.update({_join(key, sub): shown for sub, shown in texts.items()})


def _section_child(node: dict[str, Any], parts: list[str], depth: int, override: str,
                   schema: type[BaseModel] | None) -> Any:
    """The dict or list at ``node[parts[depth]]``, created when absent (a list when the next part is
    an index)."""
    part, next_part = parts[depth], parts[depth + 1]
    here = ".".join(parts[: depth + 1])
    if part.isdigit():
        _not_a_list(here.rpartition(".")[0], override)
    child = node.get(part)
    if child is None:  # not in the file (or null there): what the schema has at this key
        kind = _kind_at(schema, here.split(".")) if schema is not None else None
        if kind == "value":
            raise AvaConfigError(f"override '{override}': {here} is a value, not a section; drop the rest of the key")
        if kind == "list" or (kind is None and next_part.isdigit()):
            child = _default_list(schema, here.split(".")) if schema is not None else []
        else:
            child = {}
        node[part] = child
    if not isinstance(child, (dict, list)):
        raise AvaConfigError(f"override '{override}': {here} is a value, not a section; drop the rest of the key")
    if isinstance(child, list) and not next_part.lstrip("-").isdigit():  # (a negative index: see _list_index)
        # the index left out (`data.sources.path`), or a name in its place (`data.sources.first.path`)
        left_out = schema is None or _annotation_at(schema, [*parts[: depth + 1], "0", next_part]) is not None
        rest = parts[depth + 1:] if left_out or len(parts) == depth + 2 else parts[depth + 2:]
        raise AvaConfigError(f"override '{override}': {here} is a list; pick an item by index, e.g. "
                             f"{'.'.join([here, '0', *rest])}")
    return child


def _not_a_list(where: str, override: str) -> None:
    what = f"{where} is a section" if where else "the top level is a mapping of sections"
    raise AvaConfigError(f"override '{override}': {what}, not a list, so it has no items by index; "
                         "name one of its keys instead")


def _list_index(items: list[Any], part: str, key: str, override: str) -> int:
    """The index ``part`` of ``items``: an existing item, or ``len(items)`` to add one."""
    size = len(items)
    if part.isdigit() and int(part) <= size:
        return int(part)
    held = "no items" if size == 0 else f"{size} item{'s' if size != 1 else ''}"
    allowed = {0: "0 (to add one)", 1: "0, or 1 to add one"}.get(size, f"0 to {size - 1}, or {size} to add one")
    listed = key.rpartition(".")[0] or key
    raise AvaConfigError(f"override '{override}': {listed} holds {held}, so the index must be {allowed}; "
                         f"got '{part}'")


def _kind_at(schema: type[BaseModel], parts: list[str]) -> str | None:
    """``list``, ``section`` or ``value``: what the field at ``parts`` holds (``None``: no such field)."""
    annotation = _annotation_at(schema, parts)
    if annotation is None:
        return None
    if _item_type(annotation) is not None:
        return "list"
    return "section" if _model_in(annotation) is not None else "value"


def _default_list(schema: type[BaseModel], parts: list[str]) -> list[Any]:
    """A copy of the default of the list field at ``parts`` (``[]`` when unknown)."""
    section = _section_at(schema, tuple(int(p) if p.isdigit() else p for p in parts[:-1]))
    field = section.model_fields.get(parts[-1]) if section is not None else None
    if field is None:
        return []
    default = field.get_default(call_default_factory=True)
    if not isinstance(default, (list, tuple)):
        return []
    return [item.model_dump() if isinstance(item, BaseModel) else copy.deepcopy(item) for item in default]


def _annotation_at(schema: type[BaseModel], parts: list[str]) -> Any:
    """The type annotation of the field at dotted ``parts`` (``None`` when there is none)."""
    annotation: Any = schema
    for part in parts:
        if part.isdigit():
            annotation = _item_type(annotation)
        else:
            cls = _model_in(annotation)
            field = cls.model_fields.get(part) if cls is not None else None
            annotation = field.annotation if field is not None else None
        if annotation is None:
            return None
    return annotation


def _item_type(annotation: Any) -> Any:
    """The item type of a list or tuple annotation (inside ``X | None``), else ``None``."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return args[0] if args else None
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _item_type(arg)
            if found is not None:
                return found
    return None


def _accepts_text(annotation: Any) -> bool:
    """Whether a field of this type takes text: ``str``, a ``Literal`` of words, or a union with one."""
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(arg, str) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_text(arg) for arg in typing.get_args(annotation))
    return False


def validation_problems(err: ValidationError, schema: type[BaseModel], overridden: Iterable[str] = (),
                        written: Mapping[str, str] | None = None) -> list[str]:
    """One readable line per error of a failed validation against ``schema``.

    Args:
        err: what ``schema.model_validate`` raised.
        schema: the root model (unknown keys are matched against its sections' keys).
        overridden: dotted keys set by command-line overrides; a problem at such a key says it
            came from the command line.
        written: each value as written in the file or on the command line, by dotted key; a
            problem shows the value so (``yes`` rather than ``True``).

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
        problems.append(_describe(error, schema, written or {})
                        + (" (from the command-line override)" if from_cli else ""))
    return problems


# --------------------------------------------------------------------------------------------
# error messages
# --------------------------------------------------------------------------------------------

_NUMBER_ERRORS = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"}


def _describe(error: dict[str, Any], schema: type[BaseModel], written: Mapping[str, str]) -> str:
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
    if isinstance(got, (dict, list)):
        return f"{key}: {message[0].lower() + message[1:]}"
    shown = written.get(key) if not isinstance(got, str) else None
    shown = shown if shown is not None else repr(got)
    return f"{key}: {message[0].lower() + message[1:]} (got {shown}){_fix(error['type'], got, shown)}"


def _fix(kind: str, got: Any, shown: str) -> str:
    """The fix for a value of the wrong kind (``""`` for other errors)."""
    if isinstance(got, bool):
        if kind in _NUMBER_ERRORS:
            return f"; YAML reads {shown} as a boolean (yes/no, on/off, true/false): write a number"
        if kind == "string_type":
            return f"; YAML reads {shown} as a boolean: quote it to make it text: '{shown}'"
        if kind == "literal_error":
            return f"; YAML reads {shown} as a boolean"
    if kind in ("int_type", "int_from_float") and isinstance(got, float) and got.is_integer():
        return f"; write a whole number: {int(got)}"
    if kind in _NUMBER_ERRORS and isinstance(got, str):
        return "; write a number, without quotes"
    if kind == "string_type" and isinstance(got, (int, float, datetime.date)):
        return f"; quote it to make it text: '{shown}'"
    if kind == "bool_type":
        return "; write true or false"
    return ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


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
