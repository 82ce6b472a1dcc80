"""Train/validation split by document, sequence packing, and the fixed-window dataset.

Documents are split whole (a document's tokens never appear in both splits), then each split is
packed into one token stream, every document followed by EOS, and cut into non-overlapping
windows of ``seq_len`` tokens. A sample is just those ``seq_len`` ids (HF labels convention: the
model shifts inputs and labels itself).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AvaDataError
from .records import Document, plural

if TYPE_CHECKING:
    from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that is not predicted (PyTorch's cross_entropy default)


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
    dtype = token_dtype(tokenizer.vocab_size)
    segmented = any(d.segments is not None for d in docs)
    if not segmented:
        tokens, starts = _pack_lists(tokenizer.encode_batch([d.text for d in docs]), tokenizer, dtype)
        return TokenStream(tokens, starts, None, source_name)
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
    tokens, starts = _pack_lists(doc_ids, tokenizer, dtype)
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    return TokenStream(tokens, starts, mask, source_name)


def _pack_lists(
    token_lists: list[list[int]], tokenizer: "AvaTokenizer", dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, doc_starts)`` of documents + EOS, in one ``fromiter`` pass (no array per document).

    Appends EOS to each list in place (the lists are the caller's fresh encodings).
    """
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    for ids in token_lists:
        ids.append(tokenizer.eos_id)
    try:
        tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype, count=int(lengths.sum()))
    except OverflowError:
        raise AvaDataError(
            f"the tokenizer produced an id outside its vocabulary of {tokenizer.vocab_size}; "
            "check the tokenizer.json (or train a new one: data.tokenizer.path: null)"
        ) from None
    starts = np.zeros(len(token_lists), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return tokens, starts


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


def window_sample(stream: TokenStream, start: int, seq_len: int, source_id: int = 0) -> dict[str, torch.Tensor]:
    """The training sample of ``stream.tokens[start : start + seq_len]``.

    Position ids restart at 0 at every document start inside the window (and at the window
    start); ``document_ids`` number the documents of the window 0, 1, … (for the block-diagonal
    attention mask); labels are the ids, with -100 where the loss mask is 0.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, ``document_ids`` (each ``(seq_len,)`` int64)
        and ``source`` (a 0-d int64 tensor, the source's index in a mixture).
    """
    end = start + seq_len
    input_ids = torch.from_numpy(np.asarray(stream.tokens[start:end], dtype=np.int64))
    starts = stream.doc_starts
    inner = starts[np.searchsorted(starts, start, side="right"):np.searchsorted(starts, end, side="left")] - start
    marker = np.zeros(seq_len, dtype=np.int64)
    marker[inner] = 1
    document_ids = np.cumsum(marker)  # (T,) document index within the window
    first = np.concatenate([[0], inner])[document_ids]  # (T,) where each token's document starts
    labels = input_ids.clone()
    if stream.loss_mask is not None:
        labels[torch.from_numpy(np.asarray(stream.loss_mask[start:end]) == 0)] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.from_numpy(np.arange(seq_len, dtype=np.int64) - first),
        "document_ids": torch.from_numpy(document_ids),
        "source": torch.tensor(source_id, dtype=torch.int64),
    }


def positions_from_documents(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at each row start and each change of document id.

    Args:
        document_ids_BT: ``(B, T)`` document ids (equal within a document).

    Returns:
        ``(B, T)`` int64 positions.
    """
    B, T = document_ids_BT.shape
    t_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
    is_start_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    is_start_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    start_BT = torch.cummax(torch.where(is_start_BT, t_BT, 0), dim=1).values
    return t_BT - start_BT


class PackedDataset(Dataset):
    """Non-overlapping windows of ``seq_len`` tokens over packed token streams.

    Each stream (one in memory, or one per prepared shard) is cut into ``⌊len / seq_len⌋``
    windows; a tail shorter than ``seq_len`` is dropped. ``dataset[i]`` is the dict of
    :func:`window_sample`. Indices past ``len`` wrap around (``i mod len``), so samplers may
    encode an epoch as ``epoch · len + i``.
    """

    def __init__(
        self, streams: TokenStream | np.ndarray | Sequence[TokenStream], seq_len: int, split: str = "train",
        source_id: int = 0,
    ) -> None:
        """Wrap packed streams.

        Args:
            streams: a :class:`TokenStream`, a list of them (shards), or a bare ``(N,)`` id array
                (one stream without known document boundaries).
            seq_len: tokens per sample.
            split: split name, for error messages.
            source_id: the source's index, reported in each sample's ``source``.

        Raises:
            AvaDataError: fewer than ``seq_len`` tokens in every stream (not a single window).
        """
        if seq_len < 2:
            raise AvaDataError(f"data.seq_len={seq_len} must be at least 2")
        if isinstance(streams, np.ndarray):
            if streams.ndim != 1:
                raise AvaDataError(f"packed tokens must be 1-D, got shape {streams.shape}")
            streams = [TokenStream(streams, np.zeros(1, dtype=np.int64))]
        elif isinstance(streams, TokenStream):
            streams = [streams]
        self.streams = list(streams)
        self.seq_len = seq_len
        self.split = split
        self.source_id = source_id
        windows = np.array([len(s) // seq_len for s in self.streams], dtype=np.int64)
        self._first_window = np.concatenate([[0], np.cumsum(windows)])  # (S+1,)
        self._num_windows = int(self._first_window[-1])
        if self._num_windows == 0:
            raise AvaDataError(
                f"the {split} split has {plural(self.num_tokens, 'token')}, fewer than one window of "
                f"data.seq_len={seq_len}; lower data.seq_len or add data"
                + (" (or raise data.val_fraction)" if split == "val" else "")
            )

    @property
    def tokens(self) -> np.ndarray:
        """The token ids of the windows, concatenated (a view when there is one stream)."""
        if len(self.streams) == 1:
            return self.streams[0].tokens
        return np.concatenate([s.tokens[: (len(s) // self.seq_len) * self.seq_len] for s in self.streams])

    @property
    def num_tokens(self) -> int:
        """Tokens in the streams (including the dropped tails)."""
        return int(sum(len(s) for s in self.streams))

    @property
    def num_documents(self) -> int:
        return int(sum(s.num_documents for s in self.streams))

    def __len__(self) -> int:
        return self._num_windows

    def locate(self, index: int) -> tuple[TokenStream, int]:
        """The stream holding window ``index`` and the window's first token offset in it."""
        if index < 0:
            index += self._num_windows
        if index < 0:
            raise IndexError(f"window {index} out of range for {self._num_windows} windows")
        index %= self._num_windows
        s = int(np.searchsorted(self._first_window, index, side="right")) - 1
        return self.streams[s], int(index - self._first_window[s]) * self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        stream, start = self.locate(int(index))
        return window_sample(stream, start, self.seq_len, self.source_id)

    def __repr__(self) -> str:
        return (
            f"PackedDataset(split={self.split!r}, tokens={self.num_tokens}, "
            f"seq_len={self.seq_len}, windows={len(self)})"
        )
