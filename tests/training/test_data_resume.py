"""Exact resume of the data order: a mixture of two sources, DataLoader workers, a stop mid-run."""

import json
import random

import pytest
import torch

from Ava.models import EnhancedMoEModel
from Ava.training.run_manager import seed_everything
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config
from tests.helpers import recording_trainer

QUIET = ("logging.tensorboard=false", "evaluation.sample_max_new_tokens=0")
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "quill", "lumen"]


def _write_jsonl(path, n_docs, seed, prefix):
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n_docs):
            text = f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text}) + "\n")


_Recorder = recording_trainer()


def _config(tmp_path, cache, out, *extra):
    sources = (f"data.sources=[{{path: '{tmp_path / 'a.jsonl'}', weight: 3}}, "
               f"{{path: '{tmp_path / 'b.jsonl'}', name: small, weight: 1}}]")
    return tiny_config(out, cache, *QUIET, sources, "data.num_workers=2", "data.seq_len=32",
                       "training.max_steps=12", "training.save_every=5", "training.grad_accum_steps=2",
                       "training.batch_size=4", "training.eval_every=100", "model.max_seq_len=32", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["indexed", "streaming"])
def test_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path, corpus_cache, mode):
    _write_jsonl(tmp_path / "a.jsonl", 80, 0, "first")
    _write_jsonl(tmp_path / "b.jsonl", 12, 1, "second")
    # streaming: chunks of 8 documents (~15 windows), so the run crosses chunks and resumes inside one
    extra = ("data.streaming=true", "data.chunk_documents=8") if mode == "streaming" else ()

    config = _config(tmp_path, corpus_cache, tmp_path / "ref", *extra)
    seed_everything(config.run.seed)
    reference = _Recorder(EnhancedMoEModel(config.model), config)
    summary = reference.train()
    assert summary.steps == 12
    names = reference.data.source_names
    assert names == ["a", "small"]
    # token accounting per source follows the 3:1 weights (one epoch of slots is 4× the small source)
    shares = {n: reference.feed.source_tokens[n] / summary.tokens for n in names}
    assert abs(shares["a"] - 0.75) < 0.1 and abs(shares["small"] - 0.25) < 0.1

    config = _config(tmp_path, corpus_cache, tmp_path / "crashed", *extra)
    seed_everything(config.run.seed)
    crashed = _Recorder(EnhancedMoEModel(config.model), config)
    crashed.crash_at = 8  # the checkpoint of step 5 is the last one on disk
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    resumed = _Recorder(EnhancedMoEModel(config.model), config)
    summary = resumed.train(resume=crashed.paths.root)
    assert summary.steps == 12 and sorted(resumed.seen) == list(range(6, 13))
    for step in range(6, 13):
        for got, want in zip(resumed.seen[step], reference.seen[step], strict=True):
            assert torch.equal(got, want), f"step {step} differs after resume"
    state = load_training_state(resumed.checkpoints.last_path)
    cursor = state["data_cursor"]
    assert cursor["num_workers"] == 2 and set(cursor["source_tokens"]) == {"a", "small"}
    assert sum(cursor["source_tokens"].values()) == summary.tokens == reference.tokens
    if mode == "streaming":
        assert cursor["stream"]["chunk"] > 1  # the run crossed chunk boundaries
