"""Train/validation split by document, sequence packing, and the fixed-window dataset.

Documents are split whole (a document's tokens never appear in both splits), then each split is
packed into one token stream, every document followed by EOS, and cut into non-overlapping
windows of ``seq_len`` tokens. A sample is just those ``seq_len`` ids (HF labels convention: the
model shifts inputs and labels itself).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AvaDataError
from .records import Document

if TYPE_CHECKING:
    from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by document.

    Each document gets a key ``sha256(seed, name)``; the ``round(n · val_fraction)`` documents with
    the smallest keys (at least one when ``val_fraction > 0`` and there are two or more documents,
    never all of them) form the validation split. The result depends only on the set of documents
    and the seed, not on their order, and adding documents moves few others between splits.

    Args:
        docs: the documents (names should be unique; ties are broken by text).
        val_fraction: share of documents held out, in [0, 1).
        seed: the run seed.

    Returns:
        ``(train, val)``, each sorted by name.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise AvaDataError(f"data.val_fraction={val_fraction} must be in [0, 1), e.g. 0.05")
    ordered = sorted(docs, key=lambda d: (d.name, d.text))
    n = len(ordered)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0

    def key(index: int) -> tuple[bytes, int]:
        doc = ordered[index]
        return hashlib.sha256(f"{seed}\x00{doc.name}".encode()).digest(), index

    val_idx = set(sorted(range(n), key=key)[:n_val])
    train = [d for i, d in enumerate(ordered) if i not in val_idx]
    val = [d for i, d in enumerate(ordered) if i in val_idx]
    return train, val


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids below ``vocab_size`` (uint16 up to 65536 ids)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenStream:
    """The documents of one split of one source as one flat token stream.

    Every document is followed by EOS. Arrays may be in memory or ``numpy.memmap`` views of
    prepared shards (``shards.py``); nothing here copies them.

    Attributes:
        tokens: ``(N,)`` uint16/uint32 token ids.
        doc_starts: ``(D,)`` int64 offset of each document's first token (``doc_starts[0] == 0``).
        loss_mask: ``(N,)`` uint8, 1 where the token may be a label (predicted), 0 for prompt
            tokens of instruction/chat data; None = every token is a label.
        source_name: the source these documents came from.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    loss_mask: np.ndarray | None = None
    source_name: str = ""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts.shape[0])


def tokenize_documents(tokenizer: "AvaTokenizer", docs: Sequence[Document], source_name: str = "") -> TokenStream:
    """Encode documents into one stream, each followed by EOS, with a loss mask for segmented ones.

    Plain documents are encoded with one ``encode_batch`` call (Rust threads). A document with
    ``segments`` is encoded segment by segment; its tokens carry loss where the segment trains,
    and its EOS carries loss when the last segment does (so the model learns to stop answering).

    Args:
        tokenizer: the tokenizer.
        docs: the documents, in stream order.
        source_name: recorded on the stream.

    Returns:
        The stream; ``loss_mask`` is None when no document has segments.
    """
    segmented = any(d.segments is not None for d in docs)
    if not segmented:
        ids = tokenizer.encode_batch([d.text for d in docs])
        tokens = pack_documents(ids, tokenizer.eos_id)
        return TokenStream(tokens, _starts(ids), None, source_name)
    pieces: list[tuple[str, bool]] = []
    counts: list[int] = []
    for doc in docs:
        segments = doc.segments if doc.segments is not None else ((doc.text, True),)
        pieces.extend(segments)
        counts.append(len(segments))
    encoded = tokenizer.encode_batch([text for text, _ in pieces])
    doc_ids: list[list[int]] = []
    masks: list[np.ndarray] = []
    cursor = 0
    for count in counts:
        parts = encoded[cursor:cursor + count]
        trains = [t for _, t in pieces[cursor:cursor + count]]
        cursor += count
        doc_ids.append([i for part in parts for i in part])
        mask = [np.full(len(part), t, dtype=np.uint8) for part, t in zip(parts, trains)]
        masks.append(np.concatenate(mask + [np.array([trains[-1]], dtype=np.uint8)]))
    tokens = pack_documents(doc_ids, tokenizer.eos_id)
    return TokenStream(tokens, _starts(doc_ids), np.concatenate(masks), source_name)


def _starts(token_lists: Sequence[Sequence[int]]) -> np.ndarray:
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else np.zeros(0, np.int64)


def pack_documents(token_lists: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate documents into one stream, each followed by ``eos_id``.

    Args:
        token_lists: token ids per document.
        eos_id: id of the end-of-text token.

    Returns:
        ``(N,)`` array, ``N = Σ (len(doc) + 1)``; uint16 when every id is below 65536, else uint32.
    """
    arrays = [np.asarray(ids, dtype=np.int64) for ids in token_lists]
    max_id = max([eos_id] + [int(a.max()) for a in arrays if a.size])
    if min([eos_id] + [int(a.min()) for a in arrays if a.size]) < 0:
        raise AvaDataError("token ids must be non-negative")
    out = np.empty(sum(a.size + 1 for a in arrays), dtype=token_dtype(max_id + 1))
    pos = 0
    for a in arrays:
        out[pos:pos + a.size] = a
        out[pos + a.size] = eos_id
        pos += a.size + 1
    return out


class PackedDataset(Dataset):
    """Non-overlapping windows of ``seq_len`` tokens over a packed token stream.

    ``len`` is the number of full windows; the tail shorter than ``seq_len`` is dropped.
    ``dataset[i]`` is an int64 tensor ``(seq_len,)`` = ``tokens[i·seq_len : (i+1)·seq_len]``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train") -> None:
        """Wrap a packed stream.

        Args:
            tokens: ``(N,)`` token ids from :func:`pack_documents`.
            seq_len: tokens per sample.
            split: split name, for error messages.

        Raises:
            AvaDataError: fewer than ``seq_len`` tokens (not a single window).
        """
        if seq_len < 2:
            raise AvaDataError(f"data.seq_len={seq_len} must be at least 2")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise AvaDataError(f"packed tokens must be 1-D, got shape {tokens.shape}")
        if tokens.size < seq_len:
            raise AvaDataError(
                f"the {split} split has {tokens.size} tokens, fewer than one window of "
                f"data.seq_len={seq_len}; lower data.seq_len or add data"
                + (" (or raise data.val_fraction)" if split == "val" else "")
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.split = split
        self._num_windows = tokens.size // seq_len

    @property
    def num_tokens(self) -> int:
        """Tokens in the stream (including the dropped tail)."""
        return int(self.tokens.size)

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += self._num_windows
        if not 0 <= index < self._num_windows:
            raise IndexError(f"window {index} out of range for {self._num_windows} windows")
        start = index * self.seq_len
        window = self.tokens[start:start + self.seq_len]  # (seq_len,)
        return torch.from_numpy(window.astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"PackedDataset(split={self.split!r}, tokens={self.num_tokens}, "
            f"seq_len={self.seq_len}, windows={len(self)})"
        )
