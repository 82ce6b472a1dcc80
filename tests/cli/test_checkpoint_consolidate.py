"""``ava checkpoint consolidate``: a 2-rank sharded checkpoint of the tiny MoE (tied embeddings) gets
the model.safetensors a single-process checkpoint has, which from_pretrained loads; errors exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from Ava.cli.main import main
from tests.conftest import tiny_config
from tests.distributed_harness import run_workers


def _config(root: Path):
    return tiny_config(root / "runs", root / "cache", "model.tie_embeddings=true")


def _save_worker(rank: int, world_size: int, root: str) -> str:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from Ava.models import EnhancedMoEModel
    from Ava.utils.distributed_checkpoint import ShardedCheckpointWriter

    config = _config(Path(root))
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)  # the same weights on both ranks: DCP writes each tensor once
    sharded = {"model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))}
    writer = ShardedCheckpointWriter(Path(root) / "run" / "checkpoints")
    path = writer.save(7, sharded, config.to_yaml(), {"tokens": 1}, rank_state=rank)
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A run folder whose checkpoints/latest is a 2-rank sharded checkpoint (step 7)."""
    root = tmp_path_factory.mktemp("sharded")
    run_workers(_save_worker, 2, str(root))
    return root


def test_consolidate_matches_a_single_process_checkpoint(sharded_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from Ava.models import EnhancedMoEModel
    from Ava.utils.checkpoint import save_checkpoint

    run = sharded_run / "run"
    # before consolidation, what reads one file says how to get it
    assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    assert f"run `ava checkpoint consolidate {run}` first" in capsys.readouterr().err
    assert main(["checkpoint", "consolidate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "consolidating" in out and "2 ranks" in out and "wrote" in out
    checkpoint = run / "checkpoints" / "step_7"
    consolidated = load_file(str(checkpoint / "model.safetensors"))

    config = _config(sharded_run)
    torch.manual_seed(0)
    reference = EnhancedMoEModel(config.model)
    single = save_checkpoint(tmp_path, 7, reference, config.to_yaml(), {})
    expected = load_file(str(single / "model.safetensors"))
    assert "lm_head.weight" not in expected  # the tie is stored once
    assert set(consolidated) == set(expected)
    assert all(torch.equal(consolidated[k], expected[k]) for k in expected)

    loaded = EnhancedMoEModel.from_pretrained(run)  # verifies the manifest, which now lists the weights
    ids = torch.randint(0, config.model.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference.eval()(ids).logits)

    assert main(["checkpoint", "consolidate", str(checkpoint)]) == 0  # again: nothing to do
    assert "already consolidated" in capsys.readouterr().out


def test_consolidate_errors_exit_2(tmp_path, capsys):
    from Ava.utils.checkpoint import save_checkpoint

    assert main(["checkpoint", "consolidate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at") and err.count("\n") == 1

    single = save_checkpoint(tmp_path / "checkpoints", 1, torch.nn.Linear(2, 2), "model: {}\n", {})
    assert main(["checkpoint", "consolidate", str(single)]) == 2
    err = capsys.readouterr().err
    assert "not a sharded checkpoint" in err and "already has model.safetensors" in err and err.count("\n") == 1
