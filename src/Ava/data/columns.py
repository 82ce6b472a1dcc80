"""From a row's columns to a training document: a text field, a prompt/response template or a
chat message list, with the loss restricted to the response tokens.

``row_to_document`` is what every reader calls (:mod:`.readers`); ``Ava.multi_column_data`` is the
public path of this module. A templated or chat row becomes a document with ``segments``
(``((text, trains), ...)``); ``data.packing.tokenize_documents`` turns those into token ids and a
loss mask, so prompt tokens are inputs but never labels.

Rendering rules:

- ``template``: ``prompt`` and ``response`` are ``str.format``-style strings whose ``{column}``
  placeholders are filled from the row (``{{`` / ``}}`` are literal braces; a format spec such as
  ``{score:.2f}`` and a conversion such as ``{x!r}`` are applied as usual). A placeholder names a
  column literally (``{meta.source}`` is the column ``"meta.source"``, not an attribute). Strings
  are used as they are, numbers and booleans through ``format``/``str``, None as ``""``; a list,
  dict or bytes value is a bad row. The document is ``prompt + response`` with segments
  ``((prompt, train_on_prompt), (response, True))``.
- ``chat``: the column holds a list of ``{"role", "content"}`` messages (or a JSON string of
  one, as CSV/Parquet columns often do); roles are system, user and assistant. Each message is
  rendered with the chat template (chatml: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
  plain: ``{Role}: {content}\\n``). With ``train_on: assistant`` an assistant message's content
  and end marker train, its role header and every other message do not; with ``train_on: all``
  the whole conversation trains.

Rows that cannot be rendered are bad rows: under ``bad_rows: error`` they raise
:class:`AvaDataError` naming ``file:line``, what is wrong and the fix; under ``bad_rows: skip``
they are counted in the :class:`DataReport`. Rows with nothing to train on (an empty text or
response, an empty message list) are counted as ``empty rows``. A malformed template is a config
error (:class:`AvaConfigError`), raised on the first row whatever ``bad_rows`` says.
"""

from __future__ import annotations

import functools
import json
import numbers
import string
from typing import Any

from ..config import SourceConfig
from ..config.data_config import ChatConfig, TemplateConfig
from ..errors import AvaConfigError, AvaDataError
from .records import DataReport, Document, Row

CHAT_ROLES = ("system", "user", "assistant")
# template name → (role header, end marker); the header is formatted with the role
_CHAT_TEMPLATES = {
    "chatml": ("<|im_start|>{role}\n", "<|im_end|>\n"),
    "plain": ("{Role}: ", "\n"),
}

# One parsed piece of a template: (literal text, column or None, format spec, conversion or None).
_Piece = tuple[str, str | None, str, str | None]


class _BadRow(Exception):
    """A row that cannot be rendered: ``kind`` names the count, ``message`` says what and how to fix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def row_to_document(row: Row, source: SourceConfig, source_name: str, report: DataReport) -> Document | None:
    """Render one row as a document: its text field, its template or its chat messages.

    Args:
        row: the row (its ``fields`` are the columns).
        source: the source config (``text_field``, ``template``, ``chat``, ``bad_rows``).
        source_name: the source's name for accounting.
        report: where skipped rows are counted (empty rows always; bad rows under
            ``bad_rows: skip``).

    Returns:
        The document (with ``segments`` for template and chat rows), or None when the row is
        skipped (empty text/response/message list, or a bad row under ``bad_rows: skip``; both
        counted in ``report``).

    Raises:
        AvaDataError: a row that cannot be rendered (missing field or column, a value that is
            not text, malformed messages) under ``bad_rows: error``.
        AvaConfigError: a malformed template (unbalanced brace, ``{}`` without a column name).
    """
    try:
        if source.template is not None:
            return _template_document(row, source.template, _source_label(source), source_name, report)
        if source.chat is not None:
            return _chat_document(row, source.chat, source_name, report)
        return _text_document(row, source, source_name, report)
    except _BadRow as bad:
        return _bad(row, source, source_name, report, bad.kind, bad.message)


def validate_template(template: TemplateConfig | str, where: str = "template") -> list[str]:
    """Check a template's format strings and list the columns they use.

    Args:
        template: a :class:`TemplateConfig` (its ``prompt`` and ``response`` are checked) or one
            format string.
        where: the config key to name in errors, e.g. ``"data.sources[0].template"``; for a
            ``TemplateConfig`` ``.prompt`` / ``.response`` is appended.

    Returns:
        The column names of the placeholders, each once, in order of appearance.

    Raises:
        AvaConfigError: a malformed format string (unbalanced ``{`` or ``}``, an empty or
            positional placeholder, a nested placeholder in a format spec, an unknown conversion).
    """
    if isinstance(template, TemplateConfig):
        texts = [(f"{where}.prompt", template.prompt), (f"{where}.response", template.response)]
    else:
        texts = [(where, template)]
    names: list[str] = []
    for key, text in texts:
        try:
            pieces = _parse_template(text)
        except ValueError as err:
            raise AvaConfigError(
                f"{key}: malformed template {text!r} ({err}); write {{column}} for a column "
                "and {{ or }} for a literal brace"
            ) from None
        for _, name, _, _ in pieces:
            if name is not None and name not in names:
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# text field
# ---------------------------------------------------------------------------------------------


def _text_document(row: Row, source: SourceConfig, source_name: str, report: DataReport) -> Document | None:
    if source.text_field not in row.fields:
        raise _BadRow("missing field",
                      f"no field {source.text_field!r} (fields: {_field_list(row)}); "
                      "set text_field on this source to the field that holds the text")
    value = row.fields[source.text_field]
    if not isinstance(value, str):
        raise _BadRow("non-text field",
                      f"field {source.text_field!r} is {type(value).__name__}, not a string; "
                      "fix the row or point text_field at a text field")
    if not value.strip():
        report.add(source_name, "empty rows", row.location)
        return None
    return Document(name=row.name, text=value, source=row.location, source_name=source_name)


# ---------------------------------------------------------------------------------------------
# prompt/response templates
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _parse_template(text: str) -> tuple[_Piece, ...]:
    """Parse a format string once (every row of a source reuses it); ValueError when malformed."""
    pieces = tuple(string.Formatter().parse(text))
    for _, name, spec, conversion in pieces:
        if name is None:
            continue
        if not name.strip():
            raise ValueError("a placeholder {} names no column")
        if name.isdigit():
            raise ValueError(f"positional placeholder {{{name}}}; name a column instead")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"nested placeholder in the format spec of {{{name}}}")
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"unknown conversion !{conversion} in {{{name}}} (use !s, !r or !a)")
    return pieces


def _render(text: str, row: Row, key: str) -> str:
    """Fill ``text``'s placeholders from the row's columns (``key`` names the template in errors)."""
    out: list[str] = []
    for literal, name, spec, conversion in _parse_template(text):
        out.append(literal)
        if name is None:
            continue
        if name not in row.fields:
            raise _BadRow("missing column",
                          f"missing column {name!r} (columns: {_field_list(row)}) for {key}; "
                          "fix the row or the placeholder")
        out.append(_column_text(name, row.fields[name], spec, conversion, key))
    return "".join(out)


def _column_text(name: str, value: Any, spec: str, conversion: str | None, key: str) -> str:
    if value is None:
        return ""  # a null cell (CSV/Parquet) is an empty value, not the word "None"
    if not isinstance(value, (str, numbers.Number)):
        raise _BadRow("non-text column",
                      f"column {name!r} in {key} is {type(value).__name__}, not text or a number; "
                      "fix the row or render another column")
    if conversion == "r":
        value = repr(value)
    elif conversion == "a":
        value = ascii(value)
    elif conversion == "s":
        value = str(value)
    try:
        return format(value, spec)
    except (ValueError, TypeError) as err:
        raise _BadRow("bad format",
                      f"cannot format column {name!r} = {value!r} with {{{name}:{spec}}} in {key} ({err}); "
                      "fix the row or the format spec") from None


def _template_document(
    row: Row, template: TemplateConfig, label: str, source_name: str, report: DataReport
) -> Document | None:
    validate_template(template, where=f"data source {label}: template")
    prompt = _render(template.prompt, row, "template.prompt")
    response = _render(template.response, row, "template.response")
    if not response.strip():
        report.add(source_name, "empty rows", row.location)
        return None
    return Document(
        name=row.name,
        text=prompt + response,
        source=row.location,
        segments=((prompt, template.train_on_prompt), (response, True)),
        source_name=source_name,
    )


# ---------------------------------------------------------------------------------------------
# chat messages
# ---------------------------------------------------------------------------------------------


def _chat_document(row: Row, chat: ChatConfig, source_name: str, report: DataReport) -> Document | None:
    messages = _messages(row, chat.field)
    if not messages:
        report.add(source_name, "empty rows", row.location)
        return None
    header, end = _CHAT_TEMPLATES[chat.template]
    segments: list[tuple[str, bool]] = []
    for role, content in messages:
        trains = chat.train_on == "all" or role == "assistant"
        segments.append((header.format(role=role, Role=role.capitalize()), chat.train_on == "all"))
        segments.append((content + end, trains))
    merged = _merge_segments(segments)
    return Document(
        name=row.name,
        text="".join(text for text, _ in merged),
        source=row.location,
        segments=merged,
        source_name=source_name,
    )


def _messages(row: Row, field: str) -> list[tuple[str, str]]:
    """The row's ``(role, content)`` pairs, validated; _BadRow naming the message otherwise."""
    fix = 'each row needs a list like [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if field not in row.fields:
        raise _BadRow("missing field",
                      f"no field {field!r} (fields: {_field_list(row)}); "
                      "set chat.field on this source to the column that holds the message list")
    value = row.fields[field]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _BadRow("bad messages",
                          f"field {field!r} is a string but not a JSON list of messages ({err.msg} at "
                          f"character {err.pos}); {fix}") from None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # a numpy array of dicts (Parquet read through pandas)
    if not isinstance(value, (list, tuple)):
        raise _BadRow("bad messages", f"field {field!r} is {type(value).__name__}, not a list of messages; {fix}")
    messages: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        where = f"field {field!r} message {i}"
        if not isinstance(message, dict):
            raise _BadRow("bad messages", f"{where} is {type(message).__name__}, not an object; {fix}")
        for key in ("role", "content"):
            if key not in message:
                raise _BadRow("bad messages",
                              f"{where} has no {key!r} (keys: {', '.join(map(repr, message)) or 'none'}); "
                              f"{fix} (convert ShareGPT-style 'from'/'value' messages first)")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise _BadRow("bad messages",
                          f"{where} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise _BadRow("bad messages",
                          f"{where} has content of type {type(content).__name__}, not a string; "
                          "fix the row (content must be the message text)")
        messages.append((role, content))
    if messages and not any(role == "assistant" for role, _ in messages):
        raise _BadRow("bad messages",
                      f"field {field!r} has no assistant message, so there is no response to train on; "
                      "add one or drop the row")
    return messages


def _merge_segments(segments: list[tuple[str, bool]]) -> tuple[tuple[str, bool], ...]:
    """Join neighbouring segments with the same ``trains`` flag (fewer, longer pieces to encode)."""
    merged: list[tuple[str, bool]] = []
    for text, trains in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trains:
            merged[-1] = (merged[-1][0] + text, trains)
        else:
            merged.append((text, trains))
    return tuple(merged)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _field_list(row: Row) -> str:
    return ", ".join(repr(k) for k in row.fields) or "none"


def _source_label(source: SourceConfig) -> str:
    return repr(source.name or source.path)


def _bad(row: Row, source: SourceConfig, source_name: str, report: DataReport, kind: str, message: str) -> None:
    if source.bad_rows == "skip":
        report.add(source_name, f"skipped rows ({kind})", row.location)
        return None
    raise AvaDataError(f"{row.location}: {message} (or set bad_rows: skip on this source to count and skip such rows)")
