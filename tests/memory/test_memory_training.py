"""Replay memory in the trainer: YAML runs, the replay ratio, exact resume, config errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from Ava.cli.main import main
from Ava.config import EnhancedTrainingConfig, check_compatibility
from Ava.errors import AvaConfigError
from Ava.memory import build_replay_memory
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from Ava.utils.checkpoint import load_training_state
from tests.conftest import REPO, tiny_config
from tests.helpers import rewound_copy

QUIET = ["evaluation.sample_max_new_tokens=0", "training.eval_every=100", "training.log_every=1"]
MEMORY = ["memory.enabled=true", "memory.capacity=12", "memory.replay_ratio=0.25"]


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_training_with_memory_runs_from_a_yaml_config(tmp_path, corpus_cache):
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["memory"] = {"enabled": True, "capacity": 12, "replay_ratio": 0.25, "score": "surprise",
                        "retrieval": "cosine", "start_step": 2}
    config["training"].update(max_steps=5, log_every=1, grad_accum_steps=2)
    config["run"]["output_dir"] = str(tmp_path / "runs")
    config["data"]["cache_dir"] = str(corpus_cache)
    config["evaluation"]["sample_max_new_tokens"] = 0
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    records = _train_records(run_dir)
    # 2 micro-batches of 8 rows per step, 2 = round(0.25 × 8) of each replayed from step 2 on (the step
    # after: similarity retrieval leaves out what the previous micro-batch stored)
    assert [r["memory/replayed"] for r in records] == [0, 0, 4, 4, 4]
    assert [r["memory/size"] for r in records] == [12] * 5
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    state = load_training_state(run_dir / "checkpoints" / "step_5")["memory"]
    assert state["store"]["rows"]["input_ids"].shape == (12, 64)


@pytest.mark.parametrize("retrieval", ["importance", "euclidean"])
def test_memory_state_survives_resume_bit_exactly(tmp_path, corpus_cache, retrieval):
    overrides = [*QUIET, *MEMORY, f"memory.retrieval={retrieval}", "memory.score=grad_norm",
                 "training.max_steps=8", "training.save_every=4", "checkpoint.keep_last=null"]

    def trainer(out: Path) -> EnhancedModularTrainer:
        config = tiny_config(out, corpus_cache, *overrides)
        seed_everything(config.run.seed)
        return EnhancedModularTrainer(EnhancedMoEModel(config.model), config)

    reference = trainer(tmp_path / "a").train()
    run_a = Path(reference.run_dir)
    run_b = rewound_copy(run_a, tmp_path / "b", ["step_8"], last_step=4)
    resumed = trainer(tmp_path / "b").train(resume=run_b)
    assert resumed.resumed_from.endswith("step_4") and resumed.steps == 8
    want, got = _train_records(run_a), _train_records(run_b)
    assert [r["memory/replayed"] for r in want][4:] == [2.0] * 4  # replay happens after the resume point
    for key in ("loss", "memory/size", "memory/mean_importance", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    a = load_file(str(run_a / "checkpoints" / "step_8" / "model.safetensors"))
    b = load_file(str(run_b / "checkpoints" / "step_8" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    store_a = load_training_state(run_a / "checkpoints" / "step_8")["memory"]["store"]
    store_b = load_training_state(run_b / "checkpoints" / "step_8")["memory"]["store"]
    assert torch.equal(store_a["importance"], store_b["importance"])
    assert torch.equal(store_a["rows"]["input_ids"], store_b["rows"]["input_ids"])


def _memory_config(**memory) -> EnhancedTrainingConfig:
    return EnhancedTrainingConfig.from_dict({"training": {"batch_size": 4}, "memory": {"enabled": True, **memory}})


def test_a_replay_ratio_that_leaves_no_fresh_row_is_a_one_line_error():
    issues = {i.key: i for i in check_compatibility(_memory_config(replay_ratio=0.9))}
    issue = issues["memory.replay_ratio"]
    assert issue.severity == "error" and "leaving no fresh row" in issue.message and "\n" not in issue.message
    issue = {i.key: i for i in check_compatibility(_memory_config(replay_ratio=0.1))}["memory.replay_ratio"]
    assert issue.severity == "warning" and "nothing is replayed" in issue.message
    assert not [i for i in check_compatibility(_memory_config(replay_ratio=0.5)) if i.key.startswith("memory")]


@pytest.mark.parametrize("setting, match", [
    ({"memory": {"enabled": True, "replay_ratio": 1.0}}, "memory.replay_ratio"),
    ({"memory": {"enabled": True, "score": "gradient"}}, "memory.score"),
    ({"memory": {"enabled": True, "capacity": 0}}, "memory.capacity"),
    ({"memory": {"enabled": True, "score": "grad_norm"}, "gradient": {"surgery": {"method": "pcgrad"}}},
     "memory.score: grad_norm"),
])
def test_bad_memory_settings_are_one_line_errors(tmp_path, setting, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(setting))
    with pytest.raises(AvaConfigError, match=match) as err:
        EnhancedTrainingConfig.from_yaml(path)
    assert "\n" not in str(err.value)


def test_memory_on_several_processes_is_refused_in_one_line():
    config = _memory_config()
    with pytest.raises(AvaConfigError, match="memory.enabled: the replay memory runs in one process") as err:
        build_replay_memory(config.memory, 0, world_size=2)
    assert "\n" not in str(err.value)
    assert build_replay_memory(config.memory.model_copy(update={"enabled": False}), 0, world_size=2) is None


def test_memory_replays_streamed_batches_with_their_sources(tmp_path, corpus_cache):
    for name, words in (("a", "red green blue"), ("b", "one two three")):
        rows = [json.dumps({"text": f"{words} {i} " * 30}) for i in range(12)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    sources = f"data.sources=[{{path: '{tmp_path / 'a.jsonl'}'}}, {{path: '{tmp_path / 'b.jsonl'}'}}]"
    config = tiny_config(tmp_path / "runs", corpus_cache, *QUIET, *MEMORY, sources, "data.streaming=true",
                         "training.max_steps=4", "training.batch_size=4", "memory.replay_ratio=0.5")
    summary = EnhancedModularTrainer.from_config(config).train()
    records = _train_records(Path(summary.run_dir))
    assert [r["memory/replayed"] for r in records] == [0, 2, 2, 2]
    assert sum(records[-1][f"tokens/{n}"] for n in ("a", "b")) == summary.tokens
