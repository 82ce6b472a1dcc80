"""Sharded (DCP) checkpoints: 2-rank DDP and FSDP2 round trips bit-exact, a 2-rank checkpoint in one
process, consolidation to model.safetensors, crash safety, manifest checks, asynchronous saves.

Every multi-process part runs on forked Gloo workers (tests/distributed_harness.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from Ava.errors import AvaCheckpointError
from Ava.utils import distributed_checkpoint as dckpt
from tests.distributed_harness import run_workers

CONFIG_YAML = "model: {}\n"


# --------------------------------------------------------------------------------------------
# worker helpers (module level: they run in the forked children)
# --------------------------------------------------------------------------------------------


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return model


def _trained(kind: str, rank: int, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _wrap(kind, _model(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        model(torch.randn(4, 32, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _sharded(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=False)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, opt, options=options)}


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, opt, options=options)}


def _dump(value, folder: str, name: str) -> str:
    """Write ``value`` to ``folder/name`` and return the path: the harness queue is for small results
    (a big one can be lost when the worker leaves through os._exit before the queue's feeder thread
    has flushed it)."""
    path = Path(folder) / name
    torch.save(value, path)
    return str(path)


def _read(path: str):
    return torch.load(path, weights_only=True)


def _save_worker(rank: int, world_size: int, kind: str, directory: str, out: str, asynchronous: bool = False) -> dict:
    model, opt = _trained(kind, rank)
    writer = dckpt.ShardedCheckpointWriter(Path(directory), keep_last=2, asynchronous=asynchronous)
    path = writer.save(3, _sharded(model, opt), CONFIG_YAML, {"tokens": 123}, val_loss=1.5,
                       rank_state={"rank": rank, "rng": torch.get_rng_state()})
    if asynchronous:
        # training goes on while the shards are written: the checkpoint must hold step 3's values
        saved = _dump(_full(model, opt), out, f"saved_{rank}.pt")  # now: the full tensors may be the parameters
        model(torch.randn(4, 32)).square().mean().backward()
        opt.step()
        writer.wait()
        writer.close()
        return {"path": str(path), "full": saved}
    writer.close()
    return {"path": str(path), "full": _dump(_full(model, opt), out, f"saved_{rank}.pt")}


def _load_worker(rank: int, world_size: int, kind: str, checkpoint: str, out: str) -> dict:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = _wrap(kind, _model(1))  # different initial weights, no optimizer state yet
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    templates = _sharded(model, opt)
    dckpt.load_sharded(Path(checkpoint), templates)
    set_model_state_dict(model, templates["model"])
    set_optimizer_state_dict(model, opt, templates["optimizer"])
    state, mine = dckpt.load_sharded_state(Path(checkpoint))
    return {"full": _dump(_full(model, opt), out, f"loaded_{rank}.pt"), "tokens": state["tokens"], "rank_state": mine["rank"]}


def _round_trip_worker(rank: int, world_size: int, kind: str, directory: str, out: str,
                       asynchronous: bool = False) -> dict:
    """Save, then load into fresh objects, in one set of workers (each fork costs seconds here)."""
    saved = _save_worker(rank, world_size, kind, directory, out, asynchronous)
    loaded = _load_worker(rank, world_size, kind, saved["path"], out)
    return {"path": saved["path"], "saved": saved["full"], **loaded}


def _crash_worker(rank: int, world_size: int, directory: str) -> str:
    model, opt = _trained("ddp", rank, steps=1)
    writer = dckpt.ShardedCheckpointWriter(Path(directory))
    writer.save(1, _sharded(model, opt), CONFIG_YAML, {})
    real_save = dckpt.dcp.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if rank == 1:
            raise OSError("disk full after the shards")

    dckpt.dcp.save = save_then_die
    try:
        writer.save(2, _sharded(model, opt), CONFIG_YAML, {})
    except AvaCheckpointError as err:
        return str(err)
    finally:
        dckpt.dcp.save = real_save
    return "no error"


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory) -> tuple[Path, dict, list]:
    """A 2-rank FSDP2 checkpoint (step 3), the full model/optimizer state it holds, and what the
    workers read back into fresh FSDP2 objects."""
    root = tmp_path_factory.mktemp("fsdp")
    results = run_workers(_round_trip_worker, 2, "fsdp", str(root / "checkpoints"), str(root))
    return Path(results[0]["path"]), _read(results[0]["saved"]), results


def test_fsdp2_round_trip_is_bit_exact(fsdp_checkpoint):
    _, full, results = fsdp_checkpoint
    for rank in range(2):
        _assert_equal(full, _read(results[rank]["full"]))
        assert results[rank]["rank_state"] == rank and results[rank]["tokens"] == 123


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_ddp_round_trip_is_bit_exact(tmp_path):
    directory = tmp_path / "checkpoints"
    results = run_workers(_round_trip_worker, 2, "ddp", str(directory), str(tmp_path))
    checkpoint = Path(results[0]["path"])
    assert sorted(p.name for p in directory.iterdir()) == ["best", "latest", "step_3"]
    assert dckpt.is_sharded(checkpoint) and not (checkpoint / "model.safetensors").exists()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["sharded"] is True and manifest["world_size"] == 2 and manifest["step"] == 3
    assert {"sharded/.metadata", "state.pt", "config.yaml"} <= set(manifest["files"])
    assert any(name.endswith(".distcp") for name in manifest["files"])
    assert set(manifest["files"]) == {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}
    for rank in range(2):
        _assert_equal(_read(results[rank]["saved"]), _read(results[rank]["full"]))
        assert results[rank]["tokens"] == 123 and results[rank]["rank_state"] == rank


def test_two_rank_checkpoint_loads_in_one_process_without_process_group(fsdp_checkpoint):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    checkpoint, full, _ = fsdp_checkpoint
    assert not torch.distributed.is_initialized()
    model = _model(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    templates = _sharded(model, opt)
    dckpt.load_sharded(checkpoint, templates)
    set_model_state_dict(model, templates["model"])
    set_optimizer_state_dict(model, opt, templates["optimizer"])
    _assert_equal(full, _full(model, opt))
    state, mine = dckpt.load_sharded_state(checkpoint)
    assert mine["rank"] == 0 and state["world_size"] == 2 and "rank_state" not in state
    assert dckpt.load_sharded_state(checkpoint, rank=1)[1]["rank"] == 1
    assert dckpt.load_sharded_state(checkpoint, rank=5)[1]["rank"] == 0  # a rank the saved world lacked


def test_consolidate_writes_the_full_weights(fsdp_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from Ava.config.checkpoint_layout import verify_files

    source, full, _ = fsdp_checkpoint
    checkpoint = tmp_path / "step_3"
    import shutil

    shutil.copytree(source, checkpoint)
    weights = dckpt.consolidate(checkpoint)
    _assert_equal(full["model"], load_file(str(weights)))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["consolidated"] is True and "model.safetensors" in manifest["files"]
    verify_files(checkpoint)  # every file, the new one included
    mtime = weights.stat().st_mtime_ns
    assert dckpt.consolidate(checkpoint) == weights and weights.stat().st_mtime_ns == mtime  # idempotent
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith(".")) == []


def test_crash_after_the_shards_leaves_no_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    errors = run_workers(_crash_worker, 2, str(directory))
    assert all("disk full after the shards" in e and "rank 1" in e for e in errors), errors
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_1"]
    assert (directory / "latest").resolve() == (directory / "step_1").resolve()


def test_manifest_catches_a_corrupted_shard(fsdp_checkpoint, tmp_path):
    import shutil

    checkpoint = tmp_path / "step_3"
    shutil.copytree(fsdp_checkpoint[0], checkpoint)
    shard = sorted((checkpoint / "sharded").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    model = _model(1)
    templates = _sharded(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(AvaCheckpointError, match=rf"{shard.name} fails its sha256 check"):
        dckpt.load_sharded(checkpoint, templates)
    with pytest.raises(AvaCheckpointError, match="damaged"):
        dckpt.consolidate(checkpoint)
    from Ava.utils.checkpoint import find_good_checkpoint

    assert find_good_checkpoint(tmp_path) is None


def test_async_save_is_bit_exact(tmp_path):
    directory = tmp_path / "checkpoints"
    results = run_workers(_round_trip_worker, 2, "ddp", str(directory), str(tmp_path), True)
    assert sorted(p.name for p in directory.iterdir()) == ["best", "latest", "step_3"]  # no temporaries left
    for rank in range(2):
        _assert_equal(_read(results[rank]["saved"]), _read(results[rank]["full"]))


def test_single_process_writer_and_errors(tmp_path):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters())
    writer = dckpt.ShardedCheckpointWriter(tmp_path, keep_last=1, keep_best=0)
    for step in (1, 2):
        writer.save(step, _sharded(model, opt), CONFIG_YAML, {}, val_loss=None, rank_state=step)
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2"]
    assert dckpt.load_sharded_state(tmp_path / "latest")[1] == 2
    assert not dckpt.is_sharded(tmp_path)
    with pytest.raises(AvaCheckpointError, match="not a sharded checkpoint"):
        dckpt.load_sharded(tmp_path, {})
    with pytest.raises(AvaCheckpointError, match="not a sharded checkpoint"):
        dckpt.consolidate(tmp_path)
