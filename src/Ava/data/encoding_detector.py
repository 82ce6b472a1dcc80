"""Which text encoding a file uses, whether it is text at all, and decoding under a stated policy.

Detection looks at a sample (readers pass the first 64 KiB of the decompressed file), in order:

1. a byte-order mark (UTF-32, UTF-8, UTF-16; UTF-32 first because its LE mark starts with
   UTF-16's);
2. UTF-8: valid UTF-8 (a multi-byte character cut by the end of the sample still counts), or
   "mostly UTF-8" — valid multi-byte characters and at most as many invalid bytes, i.e. a UTF-8
   file with a few corrupt bytes, which must be reported as such rather than decoded as mojibake;
3. Windows-1252 (a superset of latin-1's printable characters) when the sample reads as Western
   European text in it: few accented letters among the letters, and no symbol wedged between
   two letters. charset-normalizer alone often ranks a Baltic code page first for plain French
   latin-1 text ("déją"). Cyrillic, Greek or Turkish bytes fail the first test, Polish the
   second; Czech/Baltic text can pass both, so such files should declare their encoding;
4. otherwise ``charset_normalizer``'s best guess (cp1251, Shift-JIS, GB18030, ...).

The chosen encoding, the reason and a confidence are returned (readers log them when the
encoding is not UTF-8).

``decode_bytes`` then decodes under the source's ``encoding_errors`` policy: ``strict`` stops with
the file, line and byte offset; ``replace`` puts U+FFFD in place of each invalid byte sequence and
counts the bytes; ``skip`` drops the row. Both are counted in the :class:`DataReport`.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

import charset_normalizer

from ..errors import AvaDataError
from .records import DataReport

# UTF-32-LE's mark starts with UTF-16-LE's, so the longer marks are tried first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# Control bytes that do not occur in text (all but tab, newlines, vertical tab, form feed, ESC).
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL_BYTES)
_BINARY_CONTROL_SHARE = 0.05
# surrogateescape turns each undecodable byte into one lone surrogate in this range.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_WESTERN = "cp1252"
# In Western European text most letters are ASCII; read as cp1252, Cyrillic, Greek or Turkish
# bytes are mostly non-ASCII letters.
_WESTERN_MAX_ACCENTED = 0.3
# A non-ASCII symbol between two letters ("Za¿ó³æ": Polish cp1250 read as cp1252) is mojibake;
# ’ (l’été) and · (col·lecció) are the exceptions.
_MOJIBAKE = re.compile(r"[^\W\d_](?=[^\x00-\x7f])(?![’·])[\W\d_][^\W\d_]")


@dataclass(frozen=True)
class Detected:
    """An encoding decision.

    Attributes:
        encoding: a Python codec name (``utf-8``, ``utf-16-le``, ``cp1252``, ...).
        bom_length: bytes of byte-order mark at the start of the data (to skip before decoding).
        confidence: 1.0 for a BOM, valid UTF-8 or a declared encoding; lower for guesses.
        reason: why, for logs (``"UTF-16-LE BOM"``, ``"valid UTF-8"``, ``"charset-normalizer guess"``).
    """

    encoding: str
    bom_length: int
    confidence: float
    reason: str


def detect_encoding(sample: bytes) -> Detected:
    """Guess the encoding of ``sample`` (the start of a file): BOM, UTF-8, cp1252, charset-normalizer.

    Args:
        sample: the first bytes of the (decompressed) file; may end inside a multi-byte character.

    Returns:
        The decision. With no plausible encoding at all (binary data) it is UTF-8 with confidence
        0, so that decoding reports the first bad byte.
    """
    bom = _bom(sample)
    if bom is not None:
        return bom
    # final=False: a character cut by the end of the sample is buffered, not an error.
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(sample, final=False)
    invalid = len(_ESCAPED_BYTE.findall(text))
    if not invalid:
        return Detected("utf-8", 0, 1.0, "valid UTF-8")
    multibyte = len(text) - len(text.encode("ascii", "ignore")) - invalid
    if multibyte >= invalid:
        return Detected("utf-8", 0, round(multibyte / (multibyte + invalid), 3),
                        f"UTF-8 with {invalid} invalid bytes in the first {len(sample)}")
    western = _as_western(sample)
    if western is not None:
        return western
    best = charset_normalizer.from_bytes(sample).best()
    if best is None:
        return Detected("utf-8", 0, 0.0, "no encoding fits; assuming UTF-8")
    # A guess is never certain: confidence 1.0 is kept for BOMs, valid UTF-8 and declarations.
    return Detected(best.encoding, 0, round(0.95 * (1.0 - best.chaos), 3), "charset-normalizer guess")


def resolve_encoding(sample: bytes, declared: str, *, file: Path | str) -> Detected:
    """The encoding to read a file with: detected (``declared == "auto"``) or the declared codec.

    A declared UTF-8/16/32 still honours a matching BOM (it is skipped, and it picks the byte
    order of a bare ``utf-16``/``utf-32``); a bare ``utf-16``/``utf-32`` without a BOM is read
    little-endian.

    Args:
        sample: the first bytes of the (decompressed) file.
        declared: the source's ``encoding`` setting (``auto`` or a codec name).
        file: the file, for the error message.

    Raises:
        AvaDataError: ``declared`` is not a codec Python knows.
    """
    if declared == "auto":
        return detect_encoding(sample)
    try:
        codec = codecs.lookup(declared).name
    except LookupError:
        raise AvaDataError(
            f"{file}: unknown encoding {declared!r} on this source; set encoding: auto or a Python "
            "codec name such as utf-8, latin-1, cp1252, utf-16"
        ) from None
    codec = codec.removesuffix("-sig")
    bom = _bom(sample)
    if bom is not None and bom.encoding.startswith(codec):  # e.g. utf-16 + a UTF-16-LE BOM
        return Detected(bom.encoding, bom.bom_length, 1.0, f"declared {declared}, {bom.reason}")
    if codec in ("utf-16", "utf-32"):
        codec += "-le"
    return Detected(codec, 0, 1.0, f"declared {declared}")


def looks_binary(sample: bytes) -> bool:
    """Whether ``sample`` (the start of a file) is binary data rather than text.

    NUL bytes, or more than 5% control bytes other than tab/newlines/form feed/ESC, mean binary.
    UTF-16/32 text is full of NUL bytes, so a UTF-16/32 BOM means text; BOM-less UTF-16 counts as
    binary (the reader's message says to declare the encoding).
    """
    if not sample:
        return False
    bom = _bom(sample)
    if bom is not None and bom.encoding != "utf-8":
        return False
    if b"\x00" in sample:
        return True
    controls = len(sample.translate(None, _NOT_CONTROL))  # deletes all but the control bytes
    return controls > _BINARY_CONTROL_SHARE * len(sample)


def decode_bytes(
    raw: bytes,
    encoding: str,
    policy: str,
    *,
    file: Path | str,
    report: DataReport,
    source_name: str,
    line: int | None = None,
    byte_offset: int = 0,
) -> str | None:
    """Decode ``raw`` under the ``encoding_errors`` policy.

    Args:
        raw: the bytes (one line of a JSONL/CSV file, or a whole text file).
        encoding: the codec.
        policy: ``strict``, ``replace`` or ``skip``.
        file: where ``raw`` comes from (messages and report locations).
        report: counts ``"replaced bytes"`` (the number of invalid bytes) and
            ``"skipped rows (undecodable)"``.
        source_name: the source's name in the report.
        line: the 1-based line ``raw`` starts at; None = ``raw`` is the file from line 1 on (the
            line of a bad byte is then counted).
        byte_offset: offset of ``raw[0]`` in the (decompressed) file.

    Returns:
        The text, or None when the row is skipped (``skip``).

    Raises:
        AvaDataError: undecodable bytes under ``strict``, naming the file, line and byte offset.
    """
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        first = err
    if line is None:
        line = 1 + str(raw[: first.start], encoding, "replace").count("\n")
    where = f"{file}:{line}"
    if policy == "replace":
        text, bad = _decode_replacing(raw, encoding)
        report.add(source_name, "replaced bytes", where, count=bad)
        return text
    if policy == "skip":
        report.add(source_name, "skipped rows (undecodable)", where)
        return None
    raise AvaDataError(
        f"{where}: invalid {encoding_label(encoding)} at byte offset {byte_offset + first.start} "
        f"({raw[first.start:first.start + 4]!r}); convert the file to UTF-8 (e.g. iconv -f latin1 "
        "-t utf-8), or set encoding: <codec> or encoding_errors: replace|skip on this source"
    )


def encoding_label(encoding: str) -> str:
    """A codec name for messages: ``UTF-8``, ``UTF-16-LE``, ``cp1252``, ``iso8859-1``."""
    name = codecs.lookup(encoding).name
    return name.upper() if name.startswith("utf") else name


def is_wide(encoding: str) -> bool:
    """Whether the codec spends more than one byte on ``\\n`` (UTF-16/32: NULs are text)."""
    return len("\n".encode(encoding)) > 1


def _bom(sample: bytes) -> Detected | None:
    for mark, encoding in _BOMS:
        if sample.startswith(mark):
            return Detected(encoding, len(mark), 1.0, f"{encoding_label(encoding)} BOM")
    return None


def _as_western(sample: bytes) -> Detected | None:
    """cp1252 when the sample reads as Western European text in it, else None."""
    try:
        text = sample.decode(_WESTERN)
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are unassigned
        return None
    letters = sum(1 for ch in text if ch.isalpha())
    accented = sum(1 for ch in text if ch > "\x7f" and ch.isalpha())
    if accented > _WESTERN_MAX_ACCENTED * letters or _MOJIBAKE.search(text):
        return None
    return Detected(_WESTERN, 0, 0.9, "Western European text (cp1252)")


def _decode_replacing(raw: bytes, encoding: str) -> tuple[str, int]:
    """Decode with U+FFFD for each invalid sequence; returns the text and the invalid byte count."""
    view = memoryview(raw)  # slices without copying
    parts: list[str] = []
    bad = pos = 0
    while True:
        try:
            parts.append(str(view[pos:], encoding))
            return "".join(parts), bad
        except UnicodeDecodeError as err:
            parts.append(str(view[pos:pos + err.start], encoding))
            parts.append("\ufffd")
            bad += err.end - err.start
            pos += err.end
