"""Exact and near-duplicate removal: what is removed, what is kept, and that it is deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasketch import MinHash

from Ava.data.dedup import DedupStats, MinHasher, dedup_documents, normalize_text, shingles, words
from Ava.data.records import Document
from Ava.errors import AvaConfigError

# 400 distinct words: every 5-word shingle of a text built from them is distinct, so the Jaccard
# similarity of two such texts is known exactly from how many words were changed.
VOCAB = [f"w{i}x" for i in range(400)]
BASE = VOCAB[:200]  # 196 shingles


def _edit(positions: list[int]) -> str:
    """BASE with the words at ``positions`` (>= 5 apart) replaced by unused words.

    Each replaced word changes the 5 shingles that contain it: J = (196 - 5m) / (196 + 5m).
    """
    words_ = list(BASE)
    for k, pos in enumerate(positions):
        words_[pos] = VOCAB[300 + k]
    return " ".join(words_)


def _doc(name: str, text: str, source: str = "web") -> Document:
    return Document(name=name, text=text, source=f"/data/{name}", source_name=source)


def _true_jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a).tolist()), set(shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


def test_exact_removes_identical_and_whitespace_variants_and_keeps_the_first():
    docs = [
        _doc("a", "Hello  world.\nSecond line"),
        _doc("b", "Hello  world.\nSecond line"),          # byte-identical
        _doc("c", "  Hello world.\t Second\n\nline "),     # whitespace variant
        _doc("d", "hello world. second line"),             # case differs: a different text
        _doc("e", "café au lait"),                          # NFC
        _doc("f", "cafe\u0301 au lait"),                    # NFD spelling of the same text
    ]
    kept, stats = dedup_documents(docs, "exact")
    assert [d.name for d in kept] == ["a", "d", "e"]
    assert (stats.documents_in, stats.exact_removed, stats.near_removed, stats.kept) == (6, 3, 0, 3)
    assert stats.examples == [("b", "a", "exact"), ("c", "a", "exact"), ("f", "e", "exact")]
    assert normalize_text("  a\u00a0\tb\n\nc  ") == "a b c"


def test_near_removes_a_small_edit_but_keeps_different_and_below_threshold_documents():
    base, near, below = " ".join(BASE), _edit([50, 120]), _edit([10, 40, 70, 100, 130, 160, 185, 195])
    assert _true_jaccard(base, near) == pytest.approx(186 / 206)      # 0.90
    assert _true_jaccard(base, below) == pytest.approx(156 / 236)     # 0.66
    different = " ".join(VOCAB[200:400])
    docs = [_doc("base", base), _doc("near", near), _doc("below", below), _doc("other", different)]

    kept, stats = dedup_documents(docs, "near", threshold=0.8)
    assert [d.name for d in kept] == ["base", "below", "other"]
    assert (stats.exact_removed, stats.near_removed, stats.kept) == (0, 1, 3)
    assert stats.examples == [("near", "base", "near")]

    # The same pair is a duplicate under a lower threshold: the threshold decides, not LSH.
    kept, _ = dedup_documents(docs, "near", threshold=0.5)
    assert [d.name for d in kept] == ["base", "other"]


def test_minhash_estimates_the_jaccard_similarity():
    hasher = MinHasher(num_perm=256)
    base = hasher.signature(" ".join(BASE))
    for positions, truth in (([50, 120], 186 / 206), ([10, 40, 70, 100, 130, 160, 185, 195], 156 / 236)):
        assert base.jaccard(hasher.signature(_edit(positions))) == pytest.approx(truth, abs=0.08)
    assert base.jaccard(hasher.signature(" ".join(VOCAB[200:]))) < 0.05


def test_near_mode_counts_exact_and_near_duplicates_separately_and_keeps_order():
    docs = [
        _doc("x", " ".join(VOCAB[200:300])),
        _doc("base", " ".join(BASE)),
        _doc("copy", " ".join(BASE) + "\n"),
        _doc("edit", _edit([77])),
        _doc("edit-copy", _edit([77])),   # exact copy of a near duplicate: names the kept document
    ]
    kept, stats = dedup_documents(docs, "near")
    assert [d.name for d in kept] == ["x", "base"]
    assert (stats.exact_removed, stats.near_removed, stats.removed, stats.kept) == (2, 1, 3, 2)
    assert stats.examples == [("copy", "base", "exact"), ("edit", "base", "near"), ("edit-copy", "base", "exact")]


def test_short_documents_are_one_shingle():
    docs = [
        _doc("a", "Good morning, Sir!"),
        _doc("b", "good morning sir"),     # same words: the same single shingle
        _doc("c", "good evening sir"),     # one of three words differs: a different shingle
        _doc("d", ""),
        _doc("e", " \n"),                  # empty after normalisation: exact copy of d
    ]
    assert len(shingles("good morning sir")) == 1
    kept, stats = dedup_documents(docs, "near")
    assert [d.name for d in kept] == ["a", "c", "d"]
    assert (stats.exact_removed, stats.near_removed) == (1, 1)


def test_threshold_one_removes_only_identical_shingle_sets():
    docs = [_doc("a", " ".join(BASE)), _doc("b", " ".join(BASE).upper() + "!"), _doc("c", _edit([100]))]
    kept, stats = dedup_documents(docs, "near", threshold=1.0)
    assert [d.name for d in kept] == ["a", "c"]
    assert stats.near_removed == 1


def test_per_source_counts_and_json_stats():
    docs = [
        _doc("a1", "alpha beta gamma", "a"),
        _doc("b1", "alpha beta gamma", "b"),
        _doc("b2", "alpha  beta gamma", "b"),
        _doc("c1", "alpha beta gamma", "c"),
        Document("u1", "alpha beta gamma", "/x/u1"),  # no source_name
        _doc("a2", "delta", "a"),
    ]
    kept, stats = dedup_documents(docs, "exact")
    assert [d.name for d in kept] == ["a1", "a2"]
    assert stats.removed_by_source == {"(unnamed)": 1, "b": 2, "c": 1}
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["removed_by_source"] == {"(unnamed)": 1, "b": 2, "c": 1}
    assert data["examples"][0] == {"removed": "b1", "kept": "a1", "kind": "exact"}
    assert (data["documents_in"], data["removed"], data["kept"]) == (6, 4, 2)
    assert "4 exact" in stats.summary()


def test_dedup_is_deterministic():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(VOCAB, 60)) for _ in range(40)]
    docs = [_doc(f"d{i}", t) for i, t in enumerate(texts)]
    # near copies: 1 of 60 words changed
    for i in range(0, 40, 4):
        edited = texts[i].split()
        edited[30] = "changed"
        docs.append(_doc(f"e{i}", " ".join(edited)))
    first = dedup_documents(docs, "near")
    second = dedup_documents(docs, "near")
    assert first == second
    assert first[1].near_removed >= 8
    # Word hashes are CRC-32 (not the per-process salted hash()), so shingles are pinned values.
    assert shingles("one two three four five six").tolist() == [39770642, 3196730555]


def test_minhasher_matches_datasketch_minhash():
    hashes = np.random.default_rng(1).integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)  # 3 chunks
    reference = MinHash(num_perm=64, seed=3, hashfunc=lambda h: h)
    reference.update_batch(hashes.tolist())
    assert np.array_equal(MinHasher(num_perm=64, seed=3).hashvalues(hashes), reference.hashvalues)
    text = " ".join(BASE)
    reference = MinHash(num_perm=128, seed=1, hashfunc=lambda h: h)
    reference.update_batch(shingles(text).tolist())
    assert np.array_equal(MinHasher().signature(text).hashvalues, reference.hashvalues)


def test_words_are_the_same_on_the_ascii_fast_path_and_split_cjk():
    assert words("Don't STOP_me now: 3.14, ok?") == [b"don", b"t", b"stop_me", b"now", b"3", b"14", b"ok"]
    assert words("Don't STOP_me now: 3.14, ok?\u00a0") == words("Don't STOP_me now: 3.14, ok?")  # regex path
    assert words("Ünïcode straße") == ["ünïcode".encode(), "straße".encode()]
    assert words("我爱北京 hello世界") == [w.encode() for w in ["我", "爱", "北", "京", "hello", "世", "界"]]


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "fuzzy"}, {"mode": "near", "threshold": 0.0}, {"mode": "near", "threshold": 1.5},
     {"mode": "near", "num_perm": 8}, {"mode": "near", "shingle_size": 0}],
)
def test_bad_arguments_raise_config_errors(kwargs):
    with pytest.raises(AvaConfigError):
        dedup_documents([_doc("a", "text")], **kwargs)


def test_empty_input():
    kept, stats = dedup_documents([], "near")
    assert kept == [] and stats == DedupStats(mode="near", threshold=0.8)
