"""Training on unpacked rows (data.packing: false): per-token loss over the step, exact resume,
worker-independent order, the padding metric, and the packed path left as it was."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from Ava.data.rows import pad_rows
from Ava.errors import AvaCheckpointError
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.batch import StepBatches, token_loss_weights
from Ava.training.run_manager import seed_everything
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config
from tests.helpers import recording_trainer

QUIET = ("logging.tensorboard=false", "evaluation.sample_max_new_tokens=0")
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "quill", "lumen"]
# no balancing terms: they are per micro-batch by design, the main loss is what must not depend on grouping
NO_AUX = ("model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")


def _write_chat(path, n_rows, seed):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_rows):
            messages = [
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 6, 20, 40])))},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def _config(tmp_path, cache, out, *extra):
    return tiny_config(out, cache, *QUIET, f"data.sources=[{{path: '{tmp_path / 'chat.jsonl'}', chat: {{}}}}]",
                       "data.packing=false", "data.seq_len=64", "training.batch_size=4", "training.eval_every=100",
                       *extra)


def _prepared_trainer(tmp_path, cache, *extra):
    """A trainer prepared on the chat rows (no run folder), and its data."""
    from Ava.data import prepare_data

    _write_chat(tmp_path / "chat.jsonl", 80, 0)
    config = _config(tmp_path, cache, tmp_path / "runs", *NO_AUX, *extra)
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    data = prepare_data(config.data, config.run.seed)
    trainer.prepare(data)
    return trainer, data


def _step_gradients(trainer, micro_batches):
    """The gradients the step clips (before the update), and its metrics."""
    grads = {}
    clip = trainer.parallel.clip_grad_norm

    def record(params, max_norm):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return clip(params, max_norm)

    trainer.parallel.clip_grad_norm = record
    try:
        metrics = trainer.train_step(micro_batches)
    finally:
        trainer.parallel.clip_grad_norm = clip
    return grads, metrics


def test_step_gradient_is_the_mean_over_loss_tokens_however_rows_are_grouped(tmp_path, corpus_cache):
    trainer, data = _prepared_trainer(tmp_path, corpus_cache)
    rows = [data.train[i] for i in range(12)]
    total = sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    start = copy.deepcopy(trainer.model.state_dict())
    opt_start = copy.deepcopy(trainer.optimizer.state_dict())
    groupings = {
        "one micro-batch": [rows],
        "2 + 4 + 6 rows": [rows[:2], rows[2:6], rows[6:]],
        "12 single rows": [[r] for r in rows],
    }
    results = {}
    for name, groups in groupings.items():
        trainer.model.load_state_dict(start)
        trainer.optimizer.load_state_dict(opt_start)
        results[name] = _step_gradients(trainer, StepBatches([pad_rows(g) for g in groups], total))
    ref_grads, ref_metrics = results["one micro-batch"]
    for name, (grads, metrics) in results.items():
        # fp32: the sums run in another order, nothing else differs (stated tolerance 1e-6 relative)
        assert metrics["lm_loss"].item() == pytest.approx(ref_metrics["lm_loss"].item(), rel=1e-6), name
        for key, g in ref_grads.items():
            assert torch.allclose(grads[key], g, rtol=1e-6, atol=1e-6 * g.abs().max().item()), f"{name}: {key}"
    # without the token weighting, grouping matters: the mean of micro-batch means is another loss
    trainer.model.load_state_dict(start)
    trainer.optimizer.load_state_dict(opt_start)
    _, plain = _step_gradients(trainer, [pad_rows(g) for g in groupings["2 + 4 + 6 rows"]])
    assert abs(plain["lm_loss"].item() - ref_metrics["lm_loss"].item()) > 1e-3


def test_packed_micro_batches_keep_one_over_accum_bit_for_bit(tmp_path, corpus_cache):
    config = tiny_config(tmp_path / "runs", corpus_cache, *QUIET)
    seed_everything(config.run.seed)
    from Ava.data import prepare_data

    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    data = prepare_data(config.data, config.run.seed)
    trainer.prepare(data)
    micro = [torch.utils.data.default_collate([data.train[i] for i in range(j, j + 4)]) for j in (0, 4, 8)]
    assert token_loss_weights(micro, 1) is None
    reference = copy.deepcopy(trainer.model)
    grads, _ = _step_gradients(trainer, micro)
    for batch in micro:  # what the step always did: each micro-batch's loss / accum
        out = reference(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
        (out.loss / len(micro)).backward()
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[name], p.grad), name


def _train_losses(run_root):
    records = [json.loads(line) for line in (run_root / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["split"] == "train"}


@pytest.mark.slow
def test_dynamic_batching_resumes_exactly_with_workers(tmp_path, corpus_cache, capsys):
    _write_chat(tmp_path / "chat.jsonl", 120, 1)
    extra = ("data.max_tokens_per_batch=128", "training.grad_accum_steps=2", "training.max_steps=12",
             "training.save_every=5", "training.log_every=1")
    Recorder = recording_trainer()
    config = _config(tmp_path, corpus_cache, tmp_path / "ref", *extra, "data.num_workers=0")
    seed_everything(config.run.seed)
    reference = Recorder(EnhancedMoEModel(config.model), config)
    assert reference.train().steps == 12
    captured = capsys.readouterr()
    assert "micro-batches of at most 128 tokens; expected padding" in captured.out + captured.err
    for step, mbs in reference.seen.items():  # the budget holds for every micro-batch
        assert all(mb.numel() <= 128 for mb in mbs), step

    # the same run with 2 workers, crashed after the checkpoint of step 5 and resumed
    config = _config(tmp_path, corpus_cache, tmp_path / "crashed", *extra, "data.num_workers=2")
    seed_everything(config.run.seed)
    crashed = Recorder(EnhancedMoEModel(config.model), config)
    crashed.crash_at = 8
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    resumed = Recorder(EnhancedMoEModel(config.model), config)
    summary = resumed.train(resume=crashed.paths.root)
    assert summary.steps == 12 and sorted(resumed.seen) == list(range(6, 13))
    for step in range(1, 8):  # workers do not change the order
        for got, want in zip(crashed.seen[step], reference.seen[step], strict=True):
            assert torch.equal(got, want), f"step {step} differs with 2 workers"
    for step in range(6, 13):
        for got, want in zip(resumed.seen[step], reference.seen[step], strict=True):
            assert torch.equal(got, want), f"step {step} differs after resume"
    want, got = _train_losses(reference.paths.root), _train_losses(resumed.paths.root)
    for step in range(6, 13):
        assert got[step]["loss"] == want[step]["loss"], f"step {step}: loss differs after resume"
        assert 0.0 <= got[step]["data/padding"] < 0.5
    cursor = load_training_state(resumed.checkpoints.last_path)["data_cursor"]
    assert cursor["batching"]["max_tokens_per_batch"] == 128 and cursor["batching"]["units_per_step"] == 2

    # another budget would point the cursor elsewhere: refused in one line
    other = _config(tmp_path, corpus_cache, tmp_path / "other", *extra, "data.max_tokens_per_batch=256")
    trainer = EnhancedModularTrainer(EnhancedMoEModel(other.model), other)
    trainer.feed.attach(resumed.data)
    with pytest.raises(AvaCheckpointError, match=r"^the checkpoint grouped its rows as .*; resume with the run's own "
                                                 r"data\.packing, data\.max_tokens_per_batch") as err:
        trainer.feed.load_state_dict(cursor)
    assert "\n" not in str(err.value)


def test_fixed_rows_log_padding_and_count_real_tokens(tmp_path, corpus_cache):
    _write_chat(tmp_path / "chat.jsonl", 60, 2)
    config = _config(tmp_path, corpus_cache, tmp_path / "run", "training.max_steps=3", "training.log_every=1")
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    trainer.train()
    losses = _train_losses(trainer.paths.root)
    assert sorted(losses) == [1, 2, 3] and all(0.0 < r["data/padding"] < 1.0 for r in losses.values())
    real = sum(trainer.feed.source_tokens.values())
    # the run's token count and the per-source accounting both count real tokens, not padding
    assert 0 < real == trainer.tokens < 3 * 8 * config.data.seq_len


def _train_run(rank, world_size, out, cache, overrides):
    from Ava.training import EnhancedModularTrainer

    summary = EnhancedModularTrainer.from_config(tiny_config(out, cache, *overrides)).train()
    return {"run_dir": str(summary.run_dir), "tokens": summary.tokens}


@pytest.mark.parametrize("layout", [
    # token budget: 2 ranks × 1 micro-batch each take the units 1 rank × 2 accumulation steps takes
    (("data.max_tokens_per_batch=128", "training.grad_accum_steps=2"), ("data.max_tokens_per_batch=128",)),
    # fixed rows: each rank pads its half of the global micro-batch of 8 rows
    (("training.batch_size=8",), ("training.batch_size=4",)),
])
def test_two_ranks_train_like_one_process(layout, tmp_path, corpus_cache):
    from tests.distributed_harness import run_workers

    _write_chat(tmp_path / "chat.jsonl", 80, 3)
    one, two = layout
    common = (f"data.sources=[{{path: '{tmp_path / 'chat.jsonl'}', chat: {{}}}}]", "data.packing=false",
              "data.seq_len=64", "training.max_steps=4", "training.log_every=1", "training.eval_every=100",
              "run.device=cpu", *QUIET, *NO_AUX)
    (ref,) = run_workers(_train_run, 1, tmp_path / "one", corpus_cache, (*common, *one))
    runs = run_workers(_train_run, 2, tmp_path / "two", corpus_cache, (*common, *two, "distributed.strategy=ddp"))
    want, got = _train_losses(Path(ref["run_dir"])), _train_losses(Path(runs[0]["run_dir"]))
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:  # fp32, the ranks' sums in another order (relative 1e-6)
        assert got[step]["lm_loss"] == pytest.approx(want[step]["lm_loss"], rel=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
        # budget: the same units; fixed rows: each rank pads its half to its own longest row
        assert got[step]["data/padding"] <= want[step]["data/padding"] + 1e-12, step


@pytest.mark.parametrize("extra,message", [
    (("training.batch_size=64",), r"^the training split has \d+ rows, 0 micro-batches of 64 rows, fewer than one step "
                                  r"needs \(1\); lower training\.batch_size"),
    (("data.max_tokens_per_batch=4096", "training.grad_accum_steps=50"),
     r"^the training split has \d+ rows, \d+ micro-batches of at most data\.max_tokens_per_batch=4096 tokens, "
     r"fewer than one step needs \(50\)"),
])
def test_too_few_rows_for_one_step_is_one_line_error(tmp_path, corpus_cache, extra, message):
    from Ava.errors import AvaDataError

    _write_chat(tmp_path / "chat.jsonl", 40, 4)
    config = _config(tmp_path, corpus_cache, tmp_path / "run", *extra)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    with pytest.raises(AvaDataError, match=message) as err:
        trainer.train()
    assert "\n" not in str(err.value)
