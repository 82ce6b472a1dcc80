"""Background writers: metrics sink and asynchronous checkpoints."""

import pytest
import torch

from Ava.errors import AvaCheckpointError
from Ava.utils.async_logging import AsyncSink
from Ava.utils.checkpoint import CheckpointWriter, load_training_state
from safetensors.torch import load_file


class ListSink:
    def __init__(self, fail_at=None):
        self.records, self.closed, self.fail_at = [], False, fail_at

    def write(self, step, split, values):
        if step == self.fail_at:
            raise OSError("disk full")
        self.records.append((step, split, values))

    def close(self):
        self.closed = True


def test_async_sink_writes_everything_in_order():
    sink = ListSink()
    writer = AsyncSink(sink)
    for step in range(200):
        writer.write(step, "train", {"loss": float(step)})
    writer.close()
    assert [r[0] for r in sink.records] == list(range(200)) and sink.closed


def test_async_sink_reraises_writer_errors():
    writer = AsyncSink(ListSink(fail_at=3))
    for step in range(5):
        writer.write(step, "train", {})
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_async_checkpoint_snapshots_before_training_moves_on(tmp_path):
    model = torch.nn.Linear(64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    writer = CheckpointWriter(tmp_path, asynchronous=True)
    path = writer.save(7, model, "model: {}\n", {"tokens": torch.arange(3)})
    with torch.no_grad():  # training goes on while the thread writes
        model.weight.add_(1.0)
    writer.wait()
    saved = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in before.items())
    assert torch.equal(load_training_state(path)["tokens"], torch.arange(3))


def test_async_checkpoint_errors_surface_on_wait(tmp_path, monkeypatch):
    import Ava.utils.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    writer = CheckpointWriter(tmp_path, asynchronous=True)
    writer.save(1, torch.nn.Linear(2, 2), "", {})
    with pytest.raises(AvaCheckpointError, match=r"failed \(OSError: no space left\)"):
        writer.wait()
    assert not (tmp_path / "step_1").exists()
