"""Encoding detection (BOM, UTF-8, charset-normalizer), binary detection and policy decoding."""

from __future__ import annotations

import codecs
import random

import charset_normalizer
import pytest

from Ava.data.encoding_detector import Detected, decode_bytes, detect_encoding, looks_binary, resolve_encoding
from Ava.data.records import DataReport
from Ava.errors import AvaDataError

FRENCH = (
    "Le café était déjà plein quand nous sommes arrivés. Noël approchait, et la façade de l'hôtel\n"
    "brillait de mille lumières. « Ça va très bien, merci », répondit-elle avec un sourire naïf.\n"
)
SMART_QUOTES = "He said “hello” — it’s fine… it costs 5 € or £4. ‘Quoted’ words – and dashes.\n"
POLISH = "Zażółć gęślą jaźń. Pchnąć w tę łódź jeża lub ośm skrzyń fig. Był mały, jak się masz?\n"
JAPANESE = "これは日本語のテキストです。今日は良い天気ですね。\n"
RUSSIAN = "Привет, как дела? Это тест кодировки. Мы читаем файлы в разных кодировках.\n"


@pytest.mark.parametrize(
    ("bom", "encoding"),
    [
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
        (codecs.BOM_UTF32_LE, "utf-32-le"),  # starts with the UTF-16-LE mark: must win over it
        (codecs.BOM_UTF32_BE, "utf-32-be"),
    ],
)
def test_bom_decides_first(bom: bytes, encoding: str):
    found = detect_encoding(bom + "héllo".encode(encoding))
    assert (found.encoding, found.bom_length, found.confidence) == (encoding, len(bom), 1.0)


def test_valid_utf8_even_when_the_sample_cuts_a_character():
    text = "naïve café 🙂"
    assert detect_encoding(text.encode()) == Detected("utf-8", 0, 1.0, "valid UTF-8")
    assert detect_encoding(text.encode()[:-2]).encoding == "utf-8"  # 🙂 is 4 bytes, cut after 2
    assert detect_encoding(b"plain ascii").encoding == "utf-8"


def test_mostly_utf8_with_a_corrupt_byte_stays_utf8():
    found = detect_encoding("déjà vu — ok\n".encode() + b"bad \xff byte\n")
    assert found.encoding == "utf-8" and 0 < found.confidence < 1 and "1 invalid bytes" in found.reason


@pytest.mark.parametrize(
    ("text", "encoding", "reason"),
    [
        (FRENCH, "latin-1", "Western"),
        (FRENCH, "cp1252", "Western"),
        (SMART_QUOTES, "cp1252", "Western"),
        ("line two caf\xe9\n", "latin-1", "Western"),
        (POLISH, "cp1250", "charset-normalizer"),
        (RUSSIAN, "cp1251", "charset-normalizer"),
        (JAPANESE, "shift_jis", "charset-normalizer"),
    ],
)
def test_legacy_encodings_are_guessed_so_the_text_decodes_correctly(text: str, encoding: str, reason: str):
    found = detect_encoding(text.encode(encoding))
    assert found.bom_length == 0 and found.reason.startswith(reason) and 0 < found.confidence < 1
    assert text.encode(encoding).decode(found.encoding) == text


def test_western_text_is_cp1252_not_charset_normalizers_baltic_guess():
    # charset-normalizer alone ranks cp1257 first for this French latin-1 text ("déją").
    assert charset_normalizer.from_bytes(FRENCH.encode("latin-1")).best().encoding != "cp1252"
    assert detect_encoding(FRENCH.encode("latin-1")).encoding == "cp1252"


def test_looks_binary():
    rng = random.Random(0)
    assert looks_binary(bytes(rng.randrange(256) for _ in range(4096)))
    assert looks_binary(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00")
    assert looks_binary(b"text\x01\x02\x03\x04\x05\x06")  # many control bytes, no NUL
    assert not looks_binary("hi there".encode("utf-16"))  # NULs, but a UTF-16 BOM
    assert not looks_binary(b"col\tumn\r\n\x1b[1mbold\x1b[0m\x0cpage\n")
    assert not looks_binary(b"")
    assert not looks_binary(FRENCH.encode("latin-1"))


def test_resolve_encoding_declared_codecs():
    assert resolve_encoding(b"abc", "auto", file="f").reason == "valid UTF-8"
    assert resolve_encoding(b"caf\xe9", "latin-1", file="f") == Detected("iso8859-1", 0, 1.0, "declared latin-1")
    assert resolve_encoding(codecs.BOM_UTF8 + b"x", "utf-8", file="f").bom_length == 3
    assert resolve_encoding(codecs.BOM_UTF16_BE + b"\x00x", "utf-16", file="f").encoding == "utf-16-be"
    assert resolve_encoding(b"x\x00", "utf-16", file="f").encoding == "utf-16-le"  # no BOM: LE
    with pytest.raises(AvaDataError, match=r"data\.txt: unknown encoding 'klingon'"):
        resolve_encoding(b"x", "klingon", file="data.txt")


def _decode(raw: bytes, policy: str, report: DataReport, **kwargs) -> str | None:
    return decode_bytes(raw, "utf-8", policy, file="d.jsonl", report=report, source_name="s", **kwargs)


def test_decode_strict_names_file_line_and_byte_offset():
    report = DataReport()
    assert _decode("ok ✓".encode(), "strict", report) == "ok ✓"
    with pytest.raises(AvaDataError) as err:
        _decode(b'{"text": "caf\xe9"}\n', "strict", report, line=7, byte_offset=100)
    message = str(err.value)
    assert message.startswith("d.jsonl:7: invalid UTF-8 at byte offset 113 (b'\\xe9\"}\\n')")
    assert "iconv -f latin1 -t utf-8" in message and "encoding_errors: replace|skip" in message
    with pytest.raises(AvaDataError, match=r"^d\.jsonl:3: invalid UTF-8 at byte offset 8 "):
        _decode(b"one\ntwo\n\xff", "strict", report)  # line=None: counted from the start
    assert report.total() == 0


def test_decode_replace_counts_bad_bytes_and_skip_counts_rows():
    report = DataReport()
    assert _decode(b"a\xffb\xfe\xfdc", "replace", report, line=2) == "a\ufffdb\ufffd\ufffdc"
    assert _decode(b"caf\xc3", "replace", report, line=3) == "caf\ufffd"  # truncated sequence: 1 byte
    assert report.counts[("s", "replaced bytes")] == 4
    assert report.examples[("s", "replaced bytes")] == ["d.jsonl:2", "d.jsonl:3"]
    assert _decode(b"bad \xff", "skip", report, line=9) is None
    assert report.counts[("s", "skipped rows (undecodable)")] == 1
    assert report.examples[("s", "skipped rows (undecodable)")] == ["d.jsonl:9"]


def test_decode_replace_in_utf16():
    report = DataReport()
    raw = "ab".encode("utf-16-le") + b"\x00\xd8" + "c".encode("utf-16-le")  # a lone high surrogate
    text = decode_bytes(raw, "utf-16-le", "replace", file="f", report=report, source_name="s")
    assert text == "ab\ufffdc" and report.total("replaced bytes") == 2
