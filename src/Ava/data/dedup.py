"""Exact and near-duplicate document removal (``data.dedup: exact | near``).

Both modes walk the documents in the given order and keep the first document of every duplicate
group, so the result depends only on the input order, never on hashing or set iteration order.

- **exact**: documents whose *normalised* text is identical. The normalisation
  (:func:`normalize_text`) is Unicode NFC, every whitespace run collapsed to one space, and leading
  and trailing whitespace stripped; case and punctuation are kept. The key is a 128-bit BLAKE2b
  digest of the normalised UTF-8 bytes.
- **near**: exact first, then MinHash over *word* shingles (``shingle_size`` consecutive words of
  the lower-cased text, punctuation dropped, see :func:`shingles`) with an LSH index. Words rather
  than characters: a 5-word shingle changes wherever a word changes, so the Jaccard similarity
  tracks "how much of the content is shared" rather than spelling, and a document has about as
  many word shingles as words (character shingles would give ~5x more hashing work). Scripts
  written without spaces (Chinese, Japanese) would be one "word" per sentence, so their
  ideographs and kana count as one word each. A document with fewer words than ``shingle_size``
  is a single shingle (its whole normalised word sequence).

LSH only proposes candidates (it has false positives by design, and is tuned for recall); a
document is dropped only when its MinHash-estimated Jaccard similarity with a kept candidate is
``>= threshold``. Documents are compared with kept documents only, so a chain A ~ B ~ C with
A !~ C keeps A and C when B goes. Near mode holds every kept document's signature and LSH entries
in memory (about 5 KB per kept document at 128 permutations and threshold 0.8).
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
from tqdm import tqdm

from ..errors import AvaConfigError
from .records import Document

if TYPE_CHECKING:  # datasketch (which imports scipy, ~0.4 s) loads only when near dedup runs
    from datasketch import LeanMinHash

UNNAMED_SOURCE = "(unnamed)"
"""Per-source key of documents without a ``source_name``."""

MAX_EXAMPLES = 5
T = TypeVar("T")
_PROGRESS_MIN_DOCS = 1000
# Rows of the (shingles x num_perm) uint32 matrix built at once: 8k rows x 128 permutations =
# 4 MiB, so a book-sized document does not allocate gigabytes at once.
_SHINGLE_CHUNK = 8192

# Han ideographs, kana and CJK symbols are words on their own; any other run of word characters
# (letters, digits, underscore, in any script) is one word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAS_CJK = re.compile(f"[{_CJK}]")
_WORD = re.compile(r"\w+")
_ASCII_SEPARATORS = bytes(c if chr(c).isalnum() or c == ord("_") else ord(" ") for c in range(128)) + bytes(128)
_WORD_CJK = re.compile(f"[^\\W{_CJK}]+|[{_CJK}]")


@dataclass
class DedupStats:
    """What deduplication removed.

    Attributes:
        mode: ``exact`` or ``near``.
        threshold: Jaccard threshold of the near stage (also recorded in exact mode).
        documents_in: documents given.
        exact_removed: documents dropped as exact duplicates (after normalisation).
        near_removed: documents dropped as near duplicates (0 in exact mode).
        kept: documents returned.
        removed_by_source: removed documents per ``source_name`` (``"(unnamed)"`` when unset).
        examples: up to ``MAX_EXAMPLES`` ``(removed name, kept name, kind)`` triples, first first;
            kind is ``exact`` or ``near``.
    """

    mode: str
    threshold: float
    documents_in: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    kept: int = 0
    removed_by_source: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def removed(self) -> int:
        """All removed documents."""
        return self.exact_removed + self.near_removed

    def to_dict(self) -> dict:
        """JSON-ready dict (examples as ``{"removed", "kept", "kind"}`` objects)."""
        return {
            "mode": self.mode,
            "threshold": self.threshold,
            "documents_in": self.documents_in,
            "exact_removed": self.exact_removed,
            "near_removed": self.near_removed,
            "removed": self.removed,
            "kept": self.kept,
            "removed_by_source": dict(sorted(self.removed_by_source.items())),
            "examples": [{"removed": r, "kept": k, "kind": kind} for r, k, kind in self.examples],
        }

    def summary(self) -> str:
        """One line for the log."""
        documents = f"{self.documents_in} document{'' if self.documents_in == 1 else 's'}"
        return (f"dedup ({self.mode}): {documents}, {self.exact_removed} exact and "
                f"{self.near_removed} near duplicates removed, {self.kept} kept")


def progress(items: Sequence[T], desc: str) -> Iterable[T]:
    """``items``, with a tqdm bar on stderr for long runs (>= 1000 items, and only on a terminal)."""
    return tqdm(items, desc=desc, unit="doc", dynamic_ncols=True, file=sys.stderr,
                disable=True if len(items) < _PROGRESS_MIN_DOCS else None)  # None: off unless a TTY


def normalize_text(text: str) -> str:
    """The text exact deduplication compares: NFC, whitespace runs → one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_digest(text: str) -> bytes:
    """16-byte BLAKE2b digest of :func:`normalize_text` (lone surrogates are hashed as-is)."""
    data = normalize_text(text).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


def source_key(doc: Document) -> str:
    """The per-source accounting key of a document: its ``source_name`` or ``"(unnamed)"``."""
    return doc.source_name or UNNAMED_SOURCE


def words(text: str) -> list[bytes]:
    """The words near-dedup shingles, UTF-8 encoded.

    Words are runs of word characters (letters and digits of any script, ``_``; Python's
    ``\\w``) in the NFC, lower-cased text, with each CJK ideograph or kana a word of its own;
    everything else separates words.
    """
    if text.isascii():
        # Same words as the regex, ~4x faster: bytes.translate maps every ASCII non-word byte to a
        # space, then one split.
        return text.encode("ascii").lower().translate(_ASCII_SEPARATORS).split()
    text = unicodedata.normalize("NFC", text).lower()
    # The CJK-aware pattern is slower; most documents contain no CJK at all.
    found = (_WORD_CJK if _HAS_CJK.search(text) else _WORD).findall(text)
    try:
        return list(map(str.encode, found))
    except UnicodeEncodeError:  # lone surrogates (e.g. from surrogateescape decoding)
        return [w.encode("utf-8", "surrogatepass") for w in found]


def shingles(text: str, shingle_size: int = 5) -> np.ndarray:
    """32-bit hashes of the word shingles of ``text`` (the set near-dedup compares).

    Each word (:func:`words`) is hashed once (CRC-32: deterministic across processes, unlike
    ``hash()``); a shingle's hash combines its words' hashes polynomially in 64 bits, is mixed
    (SplitMix64 finaliser) and folded to 32 bits.

    Args:
        text: document text.
        shingle_size: words per shingle (>= 1).

    Returns:
        ``(S,)`` uint32, one per shingle position, so a repeated shingle repeats (MinHash does not
        care; ``np.unique`` gives the set). ``S >= 1``: a text with fewer words than
        ``shingle_size`` is one shingle, the empty text included.
    """
    tokens = words(text)
    if len(tokens) < shingle_size:
        return np.array([zlib.crc32(b" ".join(tokens))], dtype=np.uint32)
    word_h = np.fromiter(map(zlib.crc32, tokens), dtype=np.uint64, count=len(tokens))  # (W,)
    n = len(tokens) - shingle_size + 1
    h = np.zeros(n, dtype=np.uint64)  # (S,) one per shingle start
    with np.errstate(over="ignore"):  # uint64 wrap-around is the intended modulo 2^64
        for j in range(shingle_size):
            h *= np.uint64(0x100000001B3)
            h += word_h[j:j + n]
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h ^ (h >> np.uint64(32))).astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (uint32 in/out), as datasketch applies to every input."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """MinHash signatures of word-shingle sets, with datasketch's ``affine32`` permutations.

    ``signature(text)`` equals ``MinHash(num_perm, seed, hashfunc=lambda h: h)`` updated with
    :func:`shingles` (a test pins this), computed as one numpy expression per document instead
    of datasketch's per-item Python loop (~4x faster on 200-word documents).

    Args:
        num_perm: permutations (signature length).
        seed: permutation seed.
        shingle_size: words per shingle.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, shingle_size: int = 5) -> None:
        from datasketch import LeanMinHash, MinHash

        self._lean = LeanMinHash
        template = MinHash(num_perm=num_perm, seed=seed)  # affine32, datasketch's default scheme
        self.a, self.b = (np.asarray(p, dtype=np.uint32) for p in template.permutations)  # (P,) each
        self.seed = seed
        self.shingle_size = shingle_size

    def hashvalues(self, hashes: np.ndarray) -> np.ndarray:
        """``(P,)`` uint32 MinHash values of a set of ``(S,)`` uint32 element hashes (S >= 1)."""
        mixed = _fmix32(hashes.astype(np.uint32, copy=False))  # (S,)
        values = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint32)  # (P,)
        for start in range(0, len(mixed), _SHINGLE_CHUNK):
            # a * h + b mod 2^32 for every (shingle, permutation), in place (uint32 wraps).
            permuted = np.multiply.outer(mixed[start:start + _SHINGLE_CHUNK], self.a)  # (s, P)
            permuted += self.b
            np.minimum(values, permuted.min(axis=0), out=values)
        return values

    def signature(self, text: str) -> LeanMinHash:
        """The MinHash of ``text``'s word shingles, ready for ``MinHashLSH``."""
        values = self.hashvalues(shingles(text, self.shingle_size))
        return self._lean(seed=self.seed, hashvalues=values, scheme="affine32")


class _NearIndex:
    """The kept documents' signatures, in an LSH index that finds a new document's best match.

    The index is tuned for recall: a missed pair is a duplicate kept, while a false candidate only
    costs one signature comparison (at 0.8: 14 bands of 9 rows propose ~97% of pairs at Jaccard
    0.85, where datasketch's default equal weights give 9 x 13 and ~69%).
    """

    def __init__(self, threshold: float, num_perm: int) -> None:
        from datasketch import MinHashLSH

        try:
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        except ValueError:
            # Near 1.0 the optimal banding is a single band, which datasketch refuses; four wide
            # bands still propose every near-identical pair.
            self.lsh = MinHashLSH(num_perm=num_perm, params=(4, num_perm // 4))
        self.signatures: dict[int, LeanMinHash] = {}

    def best_match(self, signature: LeanMinHash) -> tuple[int, float]:
        """``(index, estimated Jaccard)`` of the most similar kept candidate; ``(-1, -1.0)`` if none."""
        best, best_j = -1, -1.0
        for candidate in self.lsh.query(signature):
            j = signature.jaccard(self.signatures[candidate])
            # Ties go to the earliest document: the query returns a set, in no stable order.
            if j > best_j or (j == best_j and candidate < best):
                best, best_j = candidate, j
        return best, best_j

    def add(self, index: int, signature: LeanMinHash) -> None:
        """Index a kept document."""
        self.lsh.insert(index, signature, check_duplication=False)
        self.signatures[index] = signature


def dedup_documents(
    docs: Sequence[Document],
    mode: Literal["exact", "near"],
    threshold: float = 0.8,
    *,
    num_perm: int = 128,
    shingle_size: int = 5,
    seed: int = 1,
) -> tuple[list[Document], DedupStats]:
    """Remove exact (and, in ``near`` mode, near) duplicate documents, keeping the first of each.

    Args:
        docs: documents in their canonical order (the first of a duplicate group is kept).
        mode: ``exact`` (normalised-text hash) or ``near`` (exact, then MinHash/LSH).
        threshold: estimated Jaccard similarity of word shingles at or above which a document is a
            near duplicate of a kept one, in (0, 1].
        num_perm: MinHash permutations (>= 16); more is more accurate and slower.
        shingle_size: words per shingle (>= 1).
        seed: MinHash permutation seed; fixed for reproducible results.

    Returns:
        The kept documents in their original order, and the statistics.

    Raises:
        AvaConfigError: unknown mode or an out-of-range parameter.
    """
    if mode not in ("exact", "near"):
        raise AvaConfigError(f"data.dedup: unknown mode {mode!r}; use 'exact' or 'near' (or 'none' to skip)")
    if not 0.0 < threshold <= 1.0:
        raise AvaConfigError(f"data.dedup_threshold must be in (0, 1], got {threshold}")
    if num_perm < 16 or shingle_size < 1:
        raise AvaConfigError(f"dedup needs num_perm >= 16 and shingle_size >= 1, got {num_perm} and {shingle_size}")

    stats = DedupStats(mode=mode, threshold=threshold, documents_in=len(docs))
    removed_by_source: Counter[str] = Counter()
    representative: dict[bytes, int] = {}  # normalised-text digest -> index of a kept document
    hasher = MinHasher(num_perm, seed, shingle_size) if mode == "near" else None
    index = _NearIndex(threshold, num_perm) if mode == "near" else None

    def drop(doc: Document, kept_index: int, kind: str) -> None:
        removed_by_source[source_key(doc)] += 1
        if len(stats.examples) < MAX_EXAMPLES:
            stats.examples.append((doc.name, docs[kept_index].name, kind))

    kept: list[Document] = []
    for i, doc in enumerate(progress(docs, f"dedup ({mode})")):
        digest = text_digest(doc.text)
        first = representative.setdefault(digest, i)
        if first != i:
            stats.exact_removed += 1
            drop(doc, first, "exact")
            continue
        if index is not None:
            signature = hasher.signature(doc.text)
            best, similarity = index.best_match(signature)
            if similarity >= threshold:
                stats.near_removed += 1
                drop(doc, best, "near")
                representative[digest] = best  # later exact copies then name a kept document
                continue
            index.add(i, signature)
        kept.append(doc)

    stats.kept = len(kept)
    stats.removed_by_source = dict(sorted(removed_by_source.items()))
    return kept, stats
