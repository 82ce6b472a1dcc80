"""Pre-tokenized, memory-mapped token shards: the folder ``ava prepare`` writes and training reads.

A prepared folder holds, for each split and source, the :class:`~.packing.TokenStream` that
:func:`~.packing.tokenize_documents` would build in memory, cut into shards at document
boundaries::

    DIR/manifest.json                          what is here (written last: no manifest = incomplete)
    DIR/tokenizer.json                         the tokenizer (its sha256 is in the manifest)
    DIR/{split}/{source}/{index:05d}.tokens.bin   raw uint16/uint32 ids, every document + EOS
    DIR/{split}/{source}/{index:05d}.docs.npy     int64 offset of each document, from 0 in the shard
    DIR/{split}/{source}/{index:05d}.mask.bin     uint8 loss mask (instruction/chat sources only)

Nothing depends on the sequence length, so one folder serves any ``data.seq_len``. Shards are
written (by :mod:`.prepare`) into ``DIR.tmp-*`` and renamed into place when complete, so an
interrupted prepare never leaves a folder that looks usable. :func:`load_prepared` validates a
folder and exposes its streams as ``numpy.memmap`` views: the shards are never read into memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AvaDataError
from .packing import TokenStream
from .tokenizer import AvaTokenizer

FORMAT_NAME = "ava-prepared"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")

_PREPARE_HINT = "run `ava prepare CONFIG --out DIR`"
_REDO_HINT = "the folder is damaged or was changed after `ava prepare`; prepare it again"


@dataclass
class PreparedCorpus:
    """A validated prepared folder (see :func:`load_prepared`).

    Attributes:
        path: the folder.
        manifest: its ``manifest.json``.
        tokenizer: the tokenizer it was prepared with.
    """

    path: Path
    manifest: dict[str, Any]
    tokenizer: AvaTokenizer

    @property
    def source_names(self) -> list[str]:
        """The sources, in config order."""
        return list(self.manifest["sources"])

    @property
    def weights(self) -> dict[str, float]:
        """Mixture weight of each source, by name."""
        return {name: float(s["weight"]) for name, s in self.manifest["sources"].items()}

    @property
    def dtype(self) -> np.dtype:
        """Token id dtype of the shards (uint16 or uint32)."""
        return np.dtype(self.manifest["dtype"])

    def num_tokens(self, split: str) -> int:
        """Tokens in ``split`` over all sources (EOS included)."""
        return int(self._split(split)["tokens"])

    def num_documents(self, split: str) -> int:
        """Documents in ``split`` over all sources."""
        return int(self._split(split)["documents"])

    def streams(self, split: str) -> dict[str, list[TokenStream]]:
        """The shards of ``split`` as memory-mapped token streams.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            ``{source name: [one TokenStream per shard, in order]}`` for every source of the
            split (an empty list when a source has no documents in it); ``tokens``,
            ``doc_starts`` and ``loss_mask`` are read-only ``numpy.memmap`` views.
        """
        out: dict[str, list[TokenStream]] = {}
        for name, source in self._split(split)["sources"].items():
            streams = []
            for shard in source["shards"]:
                n = int(shard["num_tokens"])
                tokens = np.memmap(self.path / shard["tokens_file"], dtype=self.dtype, mode="r", shape=(n,))
                starts = np.load(self.path / shard["docs_file"], mmap_mode="r")
                mask = None
                if shard.get("mask_file"):
                    mask = np.memmap(self.path / shard["mask_file"], dtype=np.uint8, mode="r", shape=(n,))
                streams.append(TokenStream(tokens, starts, mask, name))
            out[name] = streams
        return out

    def _split(self, split: str) -> dict[str, Any]:
        splits = self.manifest["splits"]
        if split not in splits:
            raise AvaDataError(f"{self.path} has no split {split!r}; it has {', '.join(splits)}")
        return splits[split]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_tokens(s)} tokens" for s in self.manifest["splits"])
        return f"PreparedCorpus({str(self.path)!r}, {sizes}, vocab_size={self.tokenizer.vocab_size})"


def load_prepared(path: str | Path) -> PreparedCorpus:
    """Open and validate a folder written by ``ava prepare``.

    Checks the manifest (format and version), the tokenizer's sha256 and, for every shard, that
    its files exist with the sizes the manifest states; reads no token data.

    Args:
        path: the folder (``data.prepared``).

    Returns:
        The corpus; its streams are memory-mapped on demand.

    Raises:
        AvaDataError: a missing folder or manifest, another format version, a changed tokenizer,
            or a missing or truncated shard; the message names the file and the fix.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise AvaDataError(f"prepared folder {root} does not exist; fix data.prepared or {_PREPARE_HINT}")
    if not root.is_dir():
        raise AvaDataError(f"data.prepared={root} is a file, not a prepared folder; {_PREPARE_HINT}")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AvaDataError(f"{root} is not a prepared folder (no {MANIFEST_FILE}); {_PREPARE_HINT}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AvaDataError(f"{manifest_path} is not valid JSON ({err}); {_REDO_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise AvaDataError(f"{manifest_path} is not an Ava prepared-data manifest; {_PREPARE_HINT}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AvaDataError(
            f"{manifest_path} has format version {version} (written by Ava {manifest.get('ava_version', '?')}); "
            f"this Ava reads version {FORMAT_VERSION}: prepare the data again with this version"
        )
    for key in ("tokenizer", "dtype", "sources", "splits"):
        if key not in manifest:
            raise AvaDataError(f"{manifest_path} lacks the key {key!r}; {_REDO_HINT}")
    try:
        dtype = np.dtype(manifest["dtype"])
    except TypeError:
        raise AvaDataError(f"{manifest_path}: unknown dtype {manifest['dtype']!r}; {_REDO_HINT}") from None

    tok_path = root / manifest["tokenizer"]["file"]
    if not tok_path.is_file():
        raise AvaDataError(f"{tok_path} is missing; {_REDO_HINT}")
    digest = _sha256(tok_path)
    if digest != manifest["tokenizer"]["sha256"]:
        raise AvaDataError(
            f"{tok_path} does not match the sha256 in {MANIFEST_FILE} (the shards were tokenized with "
            "another tokenizer); restore the original file or prepare the data again"
        )
    tokenizer = AvaTokenizer.from_file(tok_path)

    for split in manifest["splits"].values():
        for source in split["sources"].values():
            for shard in source["shards"]:
                _check_shard(root, shard, dtype)
    return PreparedCorpus(root, manifest, tokenizer)


def _check_shard(root: Path, shard: Mapping[str, Any], dtype: np.dtype) -> None:
    n = int(shard["num_tokens"])
    files = [(shard["tokens_file"], n * dtype.itemsize, f"{n} tokens × {dtype.itemsize} bytes")]
    if shard.get("mask_file"):
        files.append((shard["mask_file"], n, f"{n} mask bytes"))
    for rel, expected, what in files:
        file = root / rel
        if not file.is_file():
            raise AvaDataError(f"shard file {file} is missing; {_REDO_HINT}")
        size = file.stat().st_size
        if size != expected:
            raise AvaDataError(
                f"shard file {file} has {size} bytes, the manifest says {expected} ({what}); {_REDO_HINT}"
            )
    docs_file = root / shard["docs_file"]
    if not docs_file.is_file():
        raise AvaDataError(f"shard file {docs_file} is missing; {_REDO_HINT}")
    try:
        starts = np.load(docs_file, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise AvaDataError(f"shard file {docs_file} is not a readable .npy file ({err}); {_REDO_HINT}") from None
    d = int(shard["num_documents"])
    if starts.shape != (d,) or starts.dtype != np.int64 or (d and (starts[0] != 0 or not 0 <= starts[-1] < n)):
        raise AvaDataError(
            f"shard file {docs_file} does not hold {d} document offsets within {n} tokens; {_REDO_HINT}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
