"""Sharded checkpoints of multi-process runs, through ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a folder ``checkpoints/step_N/`` like the single-file ones of
:mod:`Ava.utils.checkpoint`, with the weights and optimizer kept as DCP shards::

    sharded/            DCP files (``.metadata`` + ``__R_0.distcp`` per writing rank) of
                        ``{"model": model state dict, "optimizer": optimizer state dict}`` as
                        ``get_model_state_dict`` / ``get_optimizer_state_dict`` give them with
                        ``StateDictOptions(full_state_dict=False)``: plain tensors for DDP (DCP
                        writes each replicated tensor once), DTensors for FSDP2 and expert
                        parallelism (each rank writes its shard)
    state.pt            rank 0's other training state (``torch.load(weights_only=True)``) with
                        ``rank_state``: one entry per rank (e.g. its RNG states) and ``world_size``
    config.yaml         the run's resolved config
    tokenizer.json      the tokenizer
    manifest.json       step, val loss, ``"sharded": true``, ``world_size``, the tied weight names,
                        and size + sha256 of every file above, the DCP files included
    model.safetensors   only after :func:`consolidate` (``ava checkpoint consolidate``): the full
                        weights in the key set of a single-process checkpoint, so
                        ``EnhancedMoEModel.from_pretrained`` (generate, eval, export) reads it

Every rank writes its shards into a hidden temporary folder whose name rank 0 picks and
broadcasts (the ranks share the file system); rank 0 alone writes the shared files, hashes
everything into the manifest, fsyncs, renames the folder to ``step_N`` and switches ``latest``,
exactly like :func:`Ava.utils.checkpoint.write_checkpoint`. A failure on any rank is agreed on
by all ranks (no rank hangs in a barrier), the temporary folder is removed and every rank raises;
a killed save leaves only the hidden folder, which the next writer removes. No half-written
checkpoint ever carries a real name.

Loading is the reverse: :func:`load_sharded` fills the caller's current state dicts in place
(DCP reshards: any saved world size loads into any current one, a single process without a
process group included), after which the caller applies them with ``set_model_state_dict`` /
``set_optimizer_state_dict``; :func:`load_sharded_state` reads ``state.pt`` and this rank's entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.serialization as torch_serialization
from safetensors.torch import save_file

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..config.checkpoint_layout import (
    CONFIG_FILE, MANIFEST_FILE, SHARDED_DIR, SHARDED_METADATA, STATE_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
    manifest_problems, read_manifest, set_default_mode,
)
from ..errors import AvaCheckpointError
from .checkpoint import (
    STATE_VERSION, describe_and_sync, install_checkpoint, fsync_dir, fsync_file, load_training_state, prune_checkpoints,
    remove_stale_temporaries,
)

logger = logging.getLogger(__name__)

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
# The tie EnhancedMoEModel makes with ``tie_embeddings``: the name a single-process checkpoint drops
# (utils.checkpoint.unique_tensors keeps the first name in state-dict order). Used by consolidate()
# for checkpoints whose manifest does not record its ties.
_CONFIG_TIES = {"lm_head.weight": "embed_tokens.weight"}


# --------------------------------------------------------------------------------------------
# process-group helpers (every one also works without a process group: world of one)
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if _distributed() else 0


def _world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def _broadcast_from_rank0(value: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's ``value`` on every rank (``broadcast_object_list``)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _all_gather(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """``value`` of every rank, in rank order (``all_gather_object``)."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _agree(error: str | None, group: dist.ProcessGroup | None) -> list[str]:
    """Every rank's error (None = fine), so that all ranks take the same branch afterwards."""
    return [f"rank {r}: {e}" for r, e in enumerate(_all_gather(error, group)) if e is not None]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to load/save in a single process": that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process")
        yield


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


@dataclass
class _PendingSave:
    """A save whose DCP write may still be running (asynchronous) and which is not yet renamed."""

    step: int
    tmp: Path
    final: Path
    val_loss: float | None
    world_size: int
    tied: dict[str, str]
    future: Future
    error: str | None = None  # this rank's error so far (rank 0: also the shared files)


class ShardedCheckpointWriter:
    """Writes sharded checkpoints from every rank, and prunes old ones (rank 0).

    The interface of :class:`Ava.utils.checkpoint.CheckpointWriter`, but :meth:`save`,
    :meth:`wait` and :meth:`close` are collective: every rank of ``process_group`` calls them, in
    the same order. Constructing the writer is not collective (rank 0 removes what a killed save
    left behind). The ranks must share the file system that holds ``directory``.

    With ``asynchronous=True`` a save stages the sharded state to CPU memory (the part that
    blocks training) and ``torch.distributed.checkpoint.async_save`` writes it from a thread,
    whose collectives run on a separate Gloo process group (created at the first asynchronous
    save) so they never interleave with training's collectives. The manifest, rename and
    ``latest`` switch happen when that write is done, at the next :meth:`save` or :meth:`wait`:
    at most one save is in flight and a failed one is raised there, on every rank.

    Args:
        directory: the run's ``checkpoints/`` folder.
        keep_last: keep the N newest checkpoints (None = all).
        keep_best: also keep the N with the lowest val loss, linked as ``best`` (0 = off).
        asynchronous: write the DCP shards from a background thread.
        process_group: the ranks that save together (None = the default group, or a single
            process when there is no process group).
    """

    def __init__(self, directory: Path, keep_last: int | None = 3, keep_best: int = 1,
                 asynchronous: bool = False, process_group: dist.ProcessGroup | None = None) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.asynchronous = asynchronous
        self.process_group = process_group
        self.last_path: Path | None = None
        self._pending: _PendingSave | None = None
        self._async_group: dist.ProcessGroup | None = None
        if _rank(process_group) == 0:
            remove_stale_temporaries(self.directory)

    def save(self, step: int, sharded: dict[str, Any], config_yaml: str, state: dict[str, Any],
             tokenizer_file: Path | None = None, val_loss: float | None = None,
             rank_state: Any = None) -> Path:
        """Save ``step`` from every rank (collective); returns the folder the checkpoint has (or
        will have, when asynchronous).

        Args:
            step: optimizer step (the folder is ``step_{step}``).
            sharded: ``{"model": ..., "optimizer": ...}`` from ``get_model_state_dict`` /
                ``get_optimizer_state_dict`` with ``StateDictOptions(full_state_dict=False)``
                (tensors or DTensors; any other nesting DCP accepts works too).
            config_yaml: the resolved config as YAML text (rank 0's is written).
            state: training state other than the sharded part (rank 0's is written; tensors,
                numbers, strings, lists, dicts only).
            tokenizer_file: tokenizer.json to copy in (rank 0's).
            val_loss: validation loss at this step (for keep-best), if known.
            rank_state: this rank's own state (e.g. its RNG states); gathered into
                ``state.pt["rank_state"]``, a list indexed by rank.

        Raises:
            AvaCheckpointError: a rank failed (every rank raises; nothing is left under a real
                name). In asynchronous mode, the failure of the previous save.
        """
        self.wait()
        group = self.process_group
        rank = _rank(group)
        final = self.directory / f"step_{step}"
        tmp_name: str | None = None
        error: str | None = None
        if rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp_name = f".tmp-step_{step}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                (self.directory / tmp_name / SHARDED_DIR).mkdir(parents=True)
            except OSError as err:
                error = _describe(err)
        tmp_name, error0 = _broadcast_from_rank0((tmp_name, error), group)
        if error0 is not None:
            raise AvaCheckpointError(f"cannot create a checkpoint folder in {self.directory}: {error0}")
        tmp = self.directory / tmp_name
        rank_states = _all_gather(rank_state, group)
        world_size = _world_size(group)
        tied = _tied_names(sharded.get(MODEL_KEY, {})) if rank == 0 and isinstance(sharded, dict) else {}
        if rank == 0:
            try:
                _write_shared_files(tmp, step, state, rank_states, world_size, config_yaml, tokenizer_file)
            except Exception as err:  # noqa: BLE001 (agreed on with the other ranks below)
                error = _describe(err)
        future: Future = Future()
        try:
            if self.asynchronous:
                if self._async_group is None and _distributed():
                    # async_save's collectives run in its thread: on their own Gloo group, never
                    # interleaved with the training thread's (NCCL or Gloo) collectives.
                    self._async_group = dist.new_group(ranks=None if group is None else dist.get_process_group_ranks(group),
                                                       backend="gloo")
                result = dcp.async_save(sharded, checkpoint_id=str(tmp / SHARDED_DIR), process_group=self._async_group)
                future = getattr(result, "upload_completion", result)
            else:
                with _single_process_quiet():
                    future.set_result(dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR), process_group=group))
        except Exception as err:  # noqa: BLE001 (DCP raises CheckpointException on every rank)
            future = Future()
            future.set_exception(err)
        self._pending = _PendingSave(step, tmp, final, val_loss, world_size, tied, future, error)
        if not self.asynchronous:
            self.wait()
        self.last_path = final
        return final

    def wait(self) -> None:
        """Finish the save in flight, if any (collective): wait for its DCP write, then rank 0
        writes the manifest, renames the folder, switches ``latest`` and prunes.

        Raises:
            AvaCheckpointError: the save failed on some rank (raised on every rank).
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            self._finish(pending)

    def close(self) -> None:
        """Finish the save in flight (collective) and release the asynchronous process group."""
        try:
            self.wait()
        finally:
            if self._async_group is not None:
                dist.destroy_process_group(self._async_group)
                self._async_group = None

    def _finish(self, pending: _PendingSave) -> None:
        group = self.process_group
        rank = _rank(group)
        error = pending.error
        try:
            pending.future.result()
        except Exception as err:  # noqa: BLE001 (agreed on below)
            error = error or _describe(err)
        failures = _agree(error, group)
        if not failures and rank == 0:
            try:
                _seal(self.directory, pending)
                prune_checkpoints(self.directory, self.keep_last, self.keep_best)
            except Exception as err:  # noqa: BLE001 (broadcast below)
                failures = [f"rank 0: {_describe(err)}"]
        failures = _broadcast_from_rank0(failures, group)
        if failures:
            if rank == 0:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise AvaCheckpointError(
                f"saving checkpoint {pending.final} failed ({'; '.join(failures)}); the previous checkpoint "
                "is kept and nothing was written under that name"
            )
        logger.info("saved sharded checkpoint %s (%d ranks)", pending.final, pending.world_size)


def _write_shared_files(tmp: Path, step: int, state: dict[str, Any], rank_states: list[Any], world_size: int,
                        config_yaml: str, tokenizer_file: Path | None) -> None:
    """Rank 0's part of a save: state.pt, config.yaml and tokenizer.json."""
    payload = {**state, "version": STATE_VERSION, "step": step, "world_size": world_size, "rank_state": rank_states}
    with torch_serialization.config.patch({"save.compute_crc32": False}):  # the manifest's sha256 covers it
        torch.save(payload, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)


def _seal(directory: Path, pending: _PendingSave) -> None:
    """Hash and fsync every file, write the manifest, rename into place, switch ``latest``."""
    tmp, final = pending.tmp, pending.final
    names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="ava-ckpt-hash") as pool:
        described = dict(zip(names, pool.map(lambda name: describe_and_sync(tmp / name), names)))
    manifest = {"step": pending.step, "val_loss": pending.val_loss, "sharded": True,
                "world_size": pending.world_size, "tied": pending.tied, "files": described}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    fsync_file(tmp / MANIFEST_FILE)
    fsync_dir(tmp / SHARDED_DIR)
    fsync_dir(tmp)
    install_checkpoint(directory, tmp, final)


def _tied_names(model_state: dict[str, Any]) -> dict[str, str]:
    """``{dropped name: kept name}`` for entries sharing storage (tied weights), as
    ``utils.checkpoint.unique_tensors`` would drop them: the first name in order is kept."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied = {}
    for name, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue
        local = value.to_local() if hasattr(value, "to_local") else value
        if local.numel() == 0:  # empty shards share no data, whatever their pointers say
            continue
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(value.shape))
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def is_sharded(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` (a ``step_N`` folder) holds DCP shards (``sharded/.metadata``)."""
    return (Path(checkpoint) / SHARDED_DIR / SHARDED_METADATA).is_file()


def verify_sharded(checkpoint: Path, process_group: dist.ProcessGroup | None = None) -> None:
    """Check every file of a sharded checkpoint against its manifest; rank 0 hashes, all ranks
    get the verdict (collective when a process group exists).

    Raises:
        AvaCheckpointError: not a sharded checkpoint, or a file is missing, truncated or corrupted.
    """
    checkpoint = Path(checkpoint)
    problems: list[str] = []
    if _rank(process_group) == 0:
        if not is_sharded(checkpoint):
            problems = [f"{checkpoint} is not a sharded checkpoint (no {SHARDED_DIR}/{SHARDED_METADATA})"]
        else:
            problems = manifest_problems(checkpoint)
    problems = _broadcast_from_rank0(problems, process_group)
    if problems:
        raise AvaCheckpointError(
            f"checkpoint {checkpoint} is damaged: {'; '.join(problems)}; load an earlier checkpoint (checkpoints/step_N)"
        )


def load_sharded(checkpoint: Path, sharded_templates: dict[str, Any], verify: bool = True,
                 process_group: dist.ProcessGroup | None = None) -> None:
    """Load a sharded checkpoint's DCP files in place into the caller's current state dicts.

    Collective when a process group exists; without one (e.g. a 2-rank checkpoint read by one
    process) DCP loads with ``no_dist``. DCP reshards: every template tensor (plain or DTensor)
    receives its part of the saved global tensor. Afterwards apply the dicts with
    ``set_model_state_dict`` / ``set_optimizer_state_dict``.

    Args:
        checkpoint: the ``step_N`` folder.
        sharded_templates: ``{"model": ..., "optimizer": ...}`` from ``get_model_state_dict`` /
            ``get_optimizer_state_dict`` (``full_state_dict=False``) of the freshly built
            objects; a subset (e.g. only ``"model"``) loads only that part.
        verify: first check every file against the manifest (rank 0 hashes).
        process_group: the ranks that load together (None = default group).

    Raises:
        AvaCheckpointError: not a sharded checkpoint, a damaged file, or keys/shapes that do not
            match the checkpoint.
    """
    checkpoint = Path(checkpoint)
    if verify:
        verify_sharded(checkpoint, process_group)
    elif not is_sharded(checkpoint):
        raise AvaCheckpointError(f"{checkpoint} is not a sharded checkpoint (no {SHARDED_DIR}/{SHARDED_METADATA})")
    try:
        with _single_process_quiet():
            dcp.load(sharded_templates, checkpoint_id=str(checkpoint / SHARDED_DIR), process_group=process_group,
                     no_dist=not _distributed())
    except Exception as err:  # DCP raises CheckpointException/RuntimeError/KeyError for mismatches
        raise AvaCheckpointError(
            f"{checkpoint / SHARDED_DIR}: cannot load into the current model/optimizer ({err}); the checkpoint "
            "does not match this config"
        ) from err


def load_sharded_state(checkpoint: Path, rank: int | None = None) -> tuple[dict[str, Any], Any]:
    """``state.pt`` of a sharded checkpoint and one rank's entry of its ``rank_state``.

    Args:
        checkpoint: the ``step_N`` folder.
        rank: whose entry (None = this process's rank, 0 without a process group). A rank that
            did not exist in the saved world (it was smaller) gets rank 0's entry.

    Returns:
        ``(state, rank_state)``: the state without its ``rank_state`` list, and the entry.
    """
    state = load_training_state(checkpoint)
    entries = state.pop("rank_state", None) or [None]
    rank = _rank() if rank is None else rank
    return state, entries[rank] if rank < len(entries) else entries[0]


# --------------------------------------------------------------------------------------------
# consolidation: model.safetensors from the shards
# --------------------------------------------------------------------------------------------


def consolidate(checkpoint: Path, verify: bool = True) -> Path:
    """Write ``model.safetensors`` into a sharded checkpoint from its DCP files (one process).

    The tensors are read at their global shapes (from the DCP metadata), tied names are dropped
    as in a single-process checkpoint (the manifest's ``tied`` table; for older manifests the
    ``model.tie_embeddings`` tie of config.yaml), the file is fsynced and renamed into place and
    then ``manifest.json`` is rewritten (tmp + ``os.replace``) to list it. Running it again on a
    consolidated checkpoint does nothing. Needs no process group; memory: the full weights once.

    Args:
        checkpoint: the ``step_N`` folder.
        verify: check the DCP files and config against the manifest first.

    Returns:
        The path of ``model.safetensors``.

    Raises:
        AvaCheckpointError: not a sharded checkpoint (e.g. a single-process one, which has its
            ``model.safetensors`` already), or a damaged file.
    """
    checkpoint = Path(checkpoint)
    weights = checkpoint / WEIGHTS_FILE
    if not is_sharded(checkpoint):
        hint = f" (it already has {WEIGHTS_FILE}: nothing to consolidate)" if weights.is_file() else ""
        raise AvaCheckpointError(f"{checkpoint} is not a sharded checkpoint (no {SHARDED_DIR}/{SHARDED_METADATA}){hint}")
    manifest = read_manifest(checkpoint)
    if WEIGHTS_FILE in manifest["files"] and not manifest_problems(checkpoint, [WEIGHTS_FILE]):
        return weights  # consolidated before
    if verify:
        names = [n for n in manifest["files"] if n.startswith(f"{SHARDED_DIR}/") or n == CONFIG_FILE]
        problems = manifest_problems(checkpoint, names)
        if problems:
            raise AvaCheckpointError(f"checkpoint {checkpoint} is damaged: {'; '.join(problems)}; it cannot be "
                                     "consolidated, use an earlier checkpoint")
    tensors = read_sharded_model(checkpoint)
    tied = manifest.get("tied")
    if tied is None:
        tied = _CONFIG_TIES if _config_ties_embeddings(checkpoint) else {}
    for name, kept in tied.items():
        if name in tensors and kept in tensors:
            del tensors[name]
    tmp = checkpoint / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        set_default_mode(tmp)
        described = describe_and_sync(tmp)
        os.replace(tmp, weights)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Weights first, then the manifest: a crash in between leaves a complete (fsynced) file the
    # manifest does not list yet, which the next consolidate replaces; never a listed missing file.
    manifest["files"][WEIGHTS_FILE] = described
    manifest["consolidated"] = True
    tmp_manifest = checkpoint / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    fsync_file(tmp_manifest)
    os.replace(tmp_manifest, checkpoint / MANIFEST_FILE)
    fsync_dir(checkpoint)
    logger.info("consolidated %s (%d tensors)", weights, len(tensors))
    return weights


def read_sharded_model(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full (global-shape) model tensors of a sharded checkpoint, on the CPU, in one process.

    Every name of the saved model state dict is returned, tied names included.
    """
    sharded_dir = Path(checkpoint) / SHARDED_DIR
    try:
        metadata = dcp.FileSystemReader(str(sharded_dir)).read_metadata()
    except Exception as err:  # noqa: BLE001 (pickle/OS errors)
        raise AvaCheckpointError(f"{sharded_dir / SHARDED_METADATA}: unreadable ({err})") from err
    prefix = f"{MODEL_KEY}."
    templates: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not isinstance(meta, TensorStorageMetadata):
            continue
        templates[key[len(prefix):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not templates:
        raise AvaCheckpointError(f"{sharded_dir}: holds no `{MODEL_KEY}` tensors; not an Ava sharded checkpoint")
    with _single_process_quiet():
        dcp.load({MODEL_KEY: templates}, checkpoint_id=str(sharded_dir), no_dist=True)
    return templates


def _config_ties_embeddings(checkpoint: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load((Path(checkpoint) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    model = data.get("model") if isinstance(data, dict) else None
    return bool(isinstance(model, dict) and model.get("tie_embeddings", False))
