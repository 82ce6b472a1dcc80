"""Atomic checkpoints: a failed save never leaves a partial checkpoint; RNG state round trips."""

import random

import numpy as np
import pytest
import torch

from Ava.errors import AvaCheckpointError
from Ava.utils import checkpoint as ckpt


def _save(directory, step, model, state=None):
    return ckpt.save_checkpoint(directory, step, model, "model: {}\n", state or {"tokens": step})


def test_save_writes_everything_and_moves_latest(tmp_path):
    model = torch.nn.Linear(4, 3)
    first = _save(tmp_path, 1, model)
    second = _save(tmp_path, 2, model)
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert first.is_dir()
    assert ckpt.load_training_state(second)["tokens"] == 2
    assert ckpt.resolve_checkpoint(tmp_path) == second.resolve()  # a checkpoints/ folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1", "step_2"]


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 3)
    good = _save(tmp_path, 1, model)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(AvaCheckpointError, match=r"writing checkpoint step_2 in .* failed \(OSError: disk full\); "
                       r"about .* needed, .* free on that disk; the previous checkpoint step_1 is intact"):
        _save(tmp_path, 2, model)
    assert not (tmp_path / "step_2").exists()
    assert (tmp_path / "latest").resolve() == good.resolve()
    assert ckpt.load_training_state(tmp_path / "latest")["step"] == 1


def test_file_size_limit_is_reported_and_the_previous_checkpoint_stays(tmp_path):
    """A real write failure (``ulimit -f``) says what failed, the limit and the space needed."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, pathlib, torch
        from Ava.errors import AvaCheckpointError
        from Ava.utils import checkpoint as ckpt
        d = pathlib.Path({str(tmp_path)!r})
        ckpt.save_checkpoint(d, 1, torch.nn.Linear(4, 3), "model: {{}}\\n", {{}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            ckpt.save_checkpoint(d, 2, torch.nn.Linear(256, 256), "model: {{}}\\n", {{}})
        except AvaCheckpointError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "writing checkpoint step_2" in out.stdout and "file size limit (ulimit -f) 0.1 MiB" in out.stdout
    assert "the previous checkpoint step_1 is intact" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]
    assert ckpt.load_training_state(tmp_path / "latest")["step"] == 1


def test_resave_same_step_replaces_it(tmp_path):
    model = torch.nn.Linear(4, 3)
    _save(tmp_path, 5, model, {"tokens": 1})
    _save(tmp_path, 5, model, {"tokens": 2})
    assert ckpt.load_training_state(tmp_path / "step_5")["tokens"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_5"]


def test_state_with_arbitrary_objects_does_not_load(tmp_path):
    """weights_only=True refuses pickled objects: state must be tensors and plain values."""
    _save(tmp_path, 1, torch.nn.Linear(4, 3), {"obj": _Custom()})
    with pytest.raises(AvaCheckpointError, match="cannot be loaded"):
        ckpt.load_training_state(tmp_path / "step_1")


class _Custom:
    pass


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    folder = _save(tmp_path, 1, torch.nn.Linear(4, 3))
    (folder / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AvaCheckpointError, match="cannot be loaded"):
        ckpt.load_training_state(folder)


def test_rng_state_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _save(tmp_path, 1, torch.nn.Linear(2, 2), {"rng": ckpt.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_training_state(tmp_path / "step_1")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resolve_checkpoint_errors_on_missing(tmp_path):
    with pytest.raises(AvaCheckpointError, match="no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
