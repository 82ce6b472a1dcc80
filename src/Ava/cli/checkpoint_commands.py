"""``ava checkpoint consolidate``: the parser and its plain function.

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    """``ava checkpoint consolidate RUN_OR_CHECKPOINT``: write ``model.safetensors`` into a
    sharded checkpoint (a run folder means its ``checkpoints/latest``).

    Raises:
        AvaCheckpointError: the path does not exist or holds no checkpoint, the checkpoint is not
            sharded (it already has ``model.safetensors``), or a file is damaged (exit 2).
    """
    from ..config.checkpoint_layout import WEIGHTS_FILE, read_manifest, resolve_checkpoint, resolve_sharded_checkpoint
    from ..errors import AvaCheckpointError
    from ..utils.distributed_checkpoint import consolidate

    checkpoint = resolve_sharded_checkpoint(args.path)
    if checkpoint is None:
        found = resolve_checkpoint(args.path)  # raises the usual one-line error when there is no checkpoint
        raise AvaCheckpointError(
            f"{found} is not a sharded checkpoint: it already has {WEIGHTS_FILE} (a single-process save); "
            "nothing to consolidate, generate/eval/export read it as it is"
        )
    manifest = read_manifest(checkpoint)
    if WEIGHTS_FILE in manifest["files"] and (checkpoint / WEIGHTS_FILE).is_file():
        print(f"{checkpoint}: already consolidated ({checkpoint / WEIGHTS_FILE}); nothing to do")
        return 0
    print(f"consolidating {checkpoint} (saved by {manifest.get('world_size', '?')} ranks) ...", flush=True)
    weights = consolidate(checkpoint, verify=not args.no_verify)
    print(f"wrote {weights} ({Path(weights).stat().st_size / 2**20:.1f} MiB); "
          f"`ava generate {checkpoint}` and eval/export read it now")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``checkpoint consolidate`` on the ``ava`` subparsers."""
    checkpoint = sub.add_parser("checkpoint", parents=[common], help="work on training checkpoints")
    checkpoint_sub = checkpoint.add_subparsers(dest="checkpoint_command", required=True,
                                               parser_class=sub._parser_class)
    p = checkpoint_sub.add_parser("consolidate", parents=[common],
                                  help="write model.safetensors into a sharded (multi-process) checkpoint, so "
                                       "generate, eval and export can read it")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (its checkpoints/latest), checkpoints/ folder or checkpoint folder (step_N)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the shards against manifest.json (sha256 reads every byte once)")
    p.set_defaults(func=cmd_checkpoint_consolidate)
