"""Render ``configs/reference.yaml``: every key with its default and its description.

The file is generated from the schema and a test checks it is in sync, so the reference can never
drift from what the code accepts. Regenerate it with ``ava config reference > configs/reference.yaml``.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel

from .training_config import EnhancedTrainingConfig

_HEADER = """\
# Every key Ava's config accepts, with its default and what it does.
# Generated from the schema by `ava config reference`; tests/config/test_reference.py keeps it in sync.
# null means "derived" or "off" (the comment says which). Copy what you need into your own YAML."""


def render_reference_yaml() -> str:
    """The reference YAML text (header, then each section with commented defaults)."""
    lines = [_HEADER]
    _render_model(EnhancedTrainingConfig, lines, indent=0)
    return "\n".join(lines) + "\n"


def _render_model(cls: type[BaseModel], lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, field in cls.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            if indent == 0:
                lines.append("")
            lines.append(f"{pad}{name}:  # {field.description}")
            _render_model(sub, lines, indent + 1)
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{pad}{name}: {_scalar(default)}  # {field.description}")
        item = _list_item_model(field.annotation)
        if item is not None:
            # A list of sections: show one commented item with every key of the item.
            lines.append(f"{pad}#  each item:")
            for item_name, item_field in item.model_fields.items():
                shown = "<required>" if item_field.is_required() else _scalar(item_field.get_default())
                lines.append(f"{pad}#    {item_name}: {shown}  # {item_field.description}")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _submodel(item)
    return None


def _scalar(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)
