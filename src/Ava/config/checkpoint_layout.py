"""The files of a checkpoint folder, and how a path a user gives resolves to one.

A checkpoint folder holds ``model.safetensors`` (weights), ``config.yaml`` (the resolved config,
whose ``model`` section rebuilds the model), ``tokenizer.json``, ``state.pt`` (training state) and
``manifest.json``; a run keeps them as ``checkpoints/step_N/`` with ``checkpoints/latest`` (and
``best``) pointing at one. The layout lives here, in the bottom layer, because both ends of a
checkpoint use it: the model saves and loads its weights and config
(``EnhancedMoEModel.save_pretrained`` / ``from_pretrained``; ``models/`` imports only ``layers/``,
``losses/`` and ``config/``) and the training checkpointer (:mod:`Ava.utils.checkpoint`) writes
the rest.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AvaCheckpointError

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
BEST = "best"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a ``checkpoints/`` folder or a checkpoint folder.

    Args:
        path: what the user passed.

    Returns:
        The checkpoint folder (resolved, so a ``latest`` link is followed).

    Raises:
        AvaCheckpointError: none of the three holds ``model.safetensors``.
    """
    path = Path(path)
    for candidate in (path, path / "checkpoints" / LATEST, path / LATEST):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate.resolve()
    raise AvaCheckpointError(
        f"no checkpoint at {path}: expected {WEIGHTS_FILE} there or in {path}/checkpoints/{LATEST}; "
        "pass a run folder (runs/<name>_<time>) or a checkpoint folder"
    )
