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

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AvaDataError
from .readers import Document

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
