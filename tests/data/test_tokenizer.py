"""Byte-level BPE: exact round trip, special-token ids, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from Ava.data import EOS_TOKEN, PAD_TOKEN, AvaTokenizer, load_tokenizer, train_tokenizer
from Ava.errors import AvaDataError

ROUND_TRIP = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF",
    "héllo wörld — “quotes” naïve façade",
    "日本語のテキスト, 中文, 한국어, Ελληνικά, русский",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧 and combining e\u0301",
    "a literal <|endoftext|> and <|pad|> inside text",
    "\x00control\x07chars\x1b[0m",
]


@pytest.fixture(scope="module")
def tok(request) -> AvaTokenizer:
    from tests.helpers import fake_shakespeare_docs

    return AvaTokenizer.train(fake_shakespeare_docs().values(), vocab_size=400, min_frequency=2)


def test_special_token_ids(tok: AvaTokenizer):
    assert tok.eos_id == 0 and tok.pad_id == 1
    assert tok.tokenizer.token_to_id(EOS_TOKEN) == 0 and tok.tokenizer.token_to_id(PAD_TOKEN) == 1
    assert 260 < tok.vocab_size <= 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok: AvaTokenizer, text: str):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if text:
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_strings_in_text_are_not_special_ids(tok: AvaTokenizer):
    ids = tok.encode("x <|endoftext|> y <|pad|>")
    assert tok.eos_id not in ids and tok.pad_id not in ids


def test_bpe_merges_frequent_words(tok: AvaTokenizer):
    text = "The king loves the stars."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_encode_batch_matches_encode(tok: AvaTokenizer):
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_decode_can_skip_special_tokens(tok: AvaTokenizer):
    ids = tok.encode("abc") + [tok.eos_id] + tok.encode("def")
    assert tok.decode(ids) == "abc<|endoftext|>def"
    assert tok.decode(ids, skip_special_tokens=True) == "abcdef"


def test_save_and_load(tok: AvaTokenizer, tmp_path: Path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    loaded = AvaTokenizer.from_file(path)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (tok.vocab_size, 0, 1)
    for text in ROUND_TRIP:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert load_tokenizer(path).get_vocab_size() == tok.vocab_size


def test_train_tokenizer_is_deterministic():
    texts = ["one two three four " * 20, "five six seven " * 20]
    a = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    b = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    assert a.to_str() == b.to_str()


def test_load_errors(tmp_path: Path):
    with pytest.raises(AvaDataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(AvaDataError, match="not a valid tokenizer.json"):
        AvaTokenizer.from_file(bad)
