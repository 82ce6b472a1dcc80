"""From a row's columns to a training document: a text field, a prompt/response template or a
chat message list, with the loss restricted to the response tokens.

``row_to_document`` is what every reader calls; ``tokenize_document`` turns a document's
segments into token ids and a loss mask.
"""

from __future__ import annotations

from .config import SourceConfig
from .data.records import DataReport, Document, Row
from .errors import AvaDataError


def row_to_document(row: Row, source: SourceConfig, source_name: str, report: DataReport) -> Document | None:
    """Render one row as a document.

    Args:
        row: the row (its ``fields`` are the columns).
        source: the source config (``text_field``, ``template``, ``chat``, ``bad_rows``).
        source_name: the source's name for accounting.
        report: where skipped rows are counted (``bad_rows: skip``).

    Returns:
        The document, or None when the row is skipped (empty text, or a bad row under
        ``bad_rows: skip``; both counted in ``report``).

    Raises:
        AvaDataError: a row without the field, or with a non-string value, under ``bad_rows: error``.
    """
    if source.text_field not in row.fields:
        fields = ", ".join(repr(k) for k in row.fields) or "none"
        return _bad(row, source, source_name, report, "missing field",
                    f"no field {source.text_field!r} (fields: {fields}); "
                    "set text_field on this source to the field that holds the text")
    value = row.fields[source.text_field]
    if not isinstance(value, str):
        return _bad(row, source, source_name, report, "non-text field",
                    f"field {source.text_field!r} is {type(value).__name__}, not a string; "
                    "fix the row or point text_field at a text field")
    if not value.strip():
        report.add(source_name, "empty rows", row.location)
        return None
    return Document(name=row.name, text=value, source=row.location, source_name=source_name)


def _bad(row: Row, source: SourceConfig, source_name: str, report: DataReport, kind: str, message: str) -> None:
    if source.bad_rows == "skip":
        report.add(source_name, f"skipped rows ({kind})", row.location)
        return None
    raise AvaDataError(f"{row.location}: {message} (or set bad_rows: skip on this source to count and skip such rows)")
