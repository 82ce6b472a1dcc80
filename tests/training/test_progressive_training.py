"""Progressive training: schedule values, batch shapes in a run, curriculum order, exact resume."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from Ava.config import EnhancedTrainingConfig, apply_override, check_compatibility
from Ava.data.packing import PackedDataset
from Ava.data.sampling import EpochSampler
from Ava.errors import AvaCheckpointError
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.progressive_training import ProgressiveSchedule, window_difficulty
from Ava.training.run_manager import seed_everything
from tests.conftest import tiny_config
from tests.helpers import rewound_copy

# tiny.yaml: data.seq_len 64, batch_size 8; the fake corpus gives 102 training windows.
WARMUP = ["progressive.seq_len_warmup.start=16", "progressive.seq_len_warmup.steps=10"]
RAMP = ["progressive.batch_size_ramp.start=2", "progressive.batch_size_ramp.steps=8"]
QUIET = ["evaluation.sample_max_new_tokens=0", "logging.tensorboard=false", "training.log_every=1"]


def _schedule(tmp_path, *overrides):
    return ProgressiveSchedule(tiny_config(tmp_path, tmp_path, *overrides))


def test_schedule_values_at_chosen_steps(tmp_path):
    s = _schedule(tmp_path, *WARMUP, *RAMP)
    # t = clamp(floor((16 + 48·step/10) / 8)·8, 16, 64), then 64 from step 10
    assert [s.seq_len(k) for k in (0, 1, 2, 5, 9, 10, 500)] == [16, 16, 24, 40, 56, 64, 64]
    # b = floor(2 + 6·step/8), then 8 from step 8
    assert [s.batch_size(k) for k in (0, 1, 2, 4, 7, 8, 500)] == [2, 2, 3, 5, 7, 8, 8]
    off = _schedule(tmp_path)
    assert not off.active and off.seq_len(0) == 64 and off.batch_size(0) == 8
    assert s.active


def test_shape_cuts_windows_into_rows_and_keeps_full_batches(tmp_path):
    s = _schedule(tmp_path, *WARMUP)
    x_BT = torch.arange(2 * 64).view(2, 64)
    (rows,) = s.shape([x_BT], 0)  # t = 16: each window becomes 4 rows, all tokens kept
    assert torch.equal(rows, x_BT.view(8, 16))
    (rows,) = s.shape([x_BT], 2)  # t = 24: 2 rows per window, the last 16 tokens of each dropped
    assert torch.equal(rows, torch.stack([x_BT[0, :24], x_BT[0, 24:48], x_BT[1, :24], x_BT[1, 24:48]]))
    full = [x_BT]
    assert s.shape(full, 10)[0] is x_BT
    assert _schedule(tmp_path).shape(full, 0)[0] is x_BT


def test_total_steps_follow_the_batch_ramp(tmp_path):
    s = _schedule(tmp_path, *RAMP)
    # epoch 0: sizes 2,2,3,4,5,5,6,7 (34 windows) then ⌊68/8⌋ = 8 steps; epoch 1: ⌊102/8⌋ = 12
    assert s.steps_in_epochs(102, 1) == 16
    assert s.steps_in_epochs(102, 2) == 28
    assert _schedule(tmp_path).steps_in_epochs(102, 3) == 3 * 12
    accum = _schedule(tmp_path, *RAMP, "training.grad_accum_steps=2")
    assert accum.steps_in_epochs(102, 1) == 10  # 2×(2,2,3,4,5,5,6,7) = 68 windows, then ⌊34/16⌋ = 2


def test_default_batches_are_the_epoch_sampler_chunks(tmp_path):
    """Without progressive settings the loader sees exactly the fixed-size batches of before."""
    s = _schedule(tmp_path, "training.grad_accum_steps=3")
    ds = PackedDataset(np.arange(101 * 64) % 500, 64)
    for epoch, step, batches_in_epoch in [(0, 0, 0), (1, 4, 0), (2, 10, 6)]:
        got = list(s.batch_sampler(ds, epoch, step, batches_in_epoch))
        order = EpochSampler(len(ds), 0, epoch, start=batches_in_epoch * 8).order()[batches_in_epoch * 8:]
        usable = (len(order) // 8) // 3 * 3  # whole accumulation groups only
        # indices carry the epoch (epoch · len + window) so a mixture can draw new windows
        assert got == [(order[i * 8:(i + 1) * 8] + epoch * len(ds)).tolist() for i in range(usable)]


def _difficulty_dataset(n: int = 120, T: int = 64) -> PackedDataset:
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 2 + (i * 7) % 60, size=T) for i in range(n)]  # varied token diversity
    return PackedDataset(np.concatenate(windows), T)


@pytest.mark.parametrize("by", ["distinct_tokens", "rarity"])
def test_curriculum_orders_easy_to_hard_then_random(tmp_path, by):
    s = _schedule(tmp_path, f"progressive.curriculum.by={by}", "progressive.curriculum.steps=5", *RAMP)
    ds = _difficulty_dataset()
    random_order = EpochSampler(len(ds), 0, 0).order()
    w = s.curriculum_windows(len(ds))
    assert w == 2 + 2 + 3 + 4 + 5  # the windows of the first 5 steps of the ramp
    order = s.epoch_order(ds, 0)
    scores = window_difficulty(ds, order[:w].numpy(), by)
    assert np.all(np.diff(scores) >= 0), "curriculum prefix is not easy to hard"
    assert scores[-1] > scores[0]
    assert sorted(order[:w].tolist()) == sorted(random_order[:w].tolist())  # same windows, reordered
    assert torch.equal(order[w:], random_order[w:])  # then the normal seeded order
    assert torch.equal(s.epoch_order(ds, 1), EpochSampler(len(ds), 0, 1).order())  # later epochs untouched
    assert torch.equal(s.epoch_order(ds, 0), order)  # deterministic


def test_difficulty_scores_by_hand():
    tokens = np.array([5, 5, 5, 5, 5, 1, 2, 5, 5, 5, 5, 5], dtype=np.uint16)  # 3 windows of 4
    ds = PackedDataset(tokens, 4)
    assert window_difficulty(ds, [0, 1, 2], "distinct_tokens").tolist() == [1.0, 3.0, 1.0]
    rarity = window_difficulty(ds, [0, 1, 2], "rarity")
    p5 = 10 / 12
    assert rarity[0] == pytest.approx(-np.log(p5))
    assert rarity[1] == pytest.approx((-np.log(p5) - 2 * np.log(1 / 12) - np.log(p5)) / 4)


def test_state_dict_round_trip_and_refuses_other_settings(tmp_path):
    s = _schedule(tmp_path, *WARMUP, *RAMP)
    s.shape([torch.zeros(3, 64, dtype=torch.long)], 2)
    path = tmp_path / "state.pt"
    torch.save(s.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = _schedule(tmp_path, *WARMUP, *RAMP)
    restored.load_state_dict(state)
    assert restored.metrics() == {"micro_batch_size": 3.0, "seq_len": 24.0}
    with pytest.raises(AvaCheckpointError, match="progressive schedule"):
        _schedule(tmp_path, *WARMUP).load_state_dict(state)


def test_compatibility_rules(tmp_path):
    base = tiny_config(tmp_path, tmp_path).to_dict()

    def issues(*overrides):  # validated by the schema only, so errors come back instead of raising
        data = copy.deepcopy(base)
        for override in overrides:
            apply_override(data, override)
        config = EnhancedTrainingConfig.model_validate(data)
        return {(i.key, i.severity) for i in check_compatibility(config) if i.key.startswith("progressive")}

    assert issues() == set()
    assert issues(*WARMUP, *RAMP) == set()
    assert ("progressive.seq_len_warmup.start", "error") in issues("progressive.seq_len_warmup.start=128",
                                                                   "progressive.seq_len_warmup.steps=5")
    assert ("progressive.batch_size_ramp.start", "error") in issues("progressive.batch_size_ramp.start=9",
                                                                    "progressive.batch_size_ramp.steps=5")
    assert issues("progressive.seq_len_warmup.start=1", "progressive.seq_len_warmup.steps=5") == {
        ("progressive.seq_len_warmup.start", "error")}
    assert issues("progressive.batch_size_ramp.start=2", "progressive.batch_size_ramp.steps=60") == {
        ("progressive.batch_size_ramp.steps", "warning")}  # tiny.yaml: max_steps 60
    assert issues("progressive.seq_len_warmup.start=16") == {("progressive.seq_len_warmup.start", "warning")}
    assert issues("progressive.curriculum.by=rarity") == {("progressive.curriculum.steps", "warning")}
    assert issues("progressive.curriculum.steps=5") == {("progressive.curriculum.by", "warning")}
    assert issues("progressive.curriculum.by=rarity", "progressive.curriculum.steps=60") == {
        ("progressive.curriculum.steps", "warning")}


class _RecordingTrainer(EnhancedModularTrainer):
    """Keeps a copy of every step's micro-batches."""

    def train_step(self, micro_batches, timer=None):
        self.seen = getattr(self, "seen", []) + [[mb["input_ids"].clone() for mb in micro_batches]]
        return super().train_step(micro_batches, timer)


def test_a_run_trains_on_the_scheduled_batches(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, *QUIET, "training.max_steps=null", "training.num_epochs=1",
                         "training.grad_accum_steps=2", "progressive.batch_size_ramp.start=4",
                         "progressive.batch_size_ramp.steps=4", "progressive.seq_len_warmup.start=16",
                         "progressive.seq_len_warmup.steps=6", "progressive.curriculum.by=distinct_tokens",
                         "progressive.curriculum.steps=2")
    seed_everything(config.run.seed)
    trainer = _RecordingTrainer(EnhancedMoEModel(config.model), config)
    summary = trainer.train()
    s, ds = trainer.progressive, trainer.data.train
    # 102 windows: ramp steps of 2×(4, 5, 6, 7) windows use 44, then ⌊58/16⌋ = 3 full steps
    assert summary.steps == len(trainer.seen) == trainer.feed.total_steps() == 7
    order, pos, tokens = s.epoch_order(ds, 0), 0, 0
    for step, micro_batches in enumerate(trainer.seen):
        b, t = s.batch_size(step), s.seq_len(step)
        assert len(micro_batches) == 2
        for mb in micro_batches:
            assert mb.shape == (b * (64 // t), t), (step, mb.shape)
            windows = torch.stack([ds[i]["input_ids"] for i in order[pos:pos + b].tolist()])
            assert torch.equal(mb, s.shape([windows], step)[0])
            pos += b
            tokens += mb.numel()
    assert summary.tokens == tokens < 7 * 2 * 8 * 64
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["seq_len"] for r in train] == [s.seq_len(k) for k in range(7)]
    assert [r["micro_batch_size"] for r in train] == [s.batch_size(k) for k in range(7)]


def test_resume_mid_schedule_is_bit_exact(tmp_path, corpus_cache):
    """Resume from step 6 (inside warmup, ramp and curriculum); the run crosses an epoch at step 16."""
    overrides = [*QUIET, *WARMUP, *RAMP, "progressive.curriculum.by=rarity", "progressive.curriculum.steps=8",
                 "training.max_steps=18", "training.save_every=6", "checkpoint.keep_last=null",
                 "training.eval_every=100"]

    def trainer(out):
        config = tiny_config(out, corpus_cache, *overrides)
        seed_everything(config.run.seed)
        return EnhancedModularTrainer(EnhancedMoEModel(config.model), config)

    reference = trainer(tmp_path / "a").train()
    assert reference.steps == 18
    run_a = Path(reference.run_dir)
    run_b = rewound_copy(run_a, tmp_path / "b", ["step_12", "step_18"])
    resumed = trainer(tmp_path / "b").train(resume=run_b)
    assert resumed.resumed_from.endswith("step_6") and resumed.steps == 18
    assert resumed.tokens == reference.tokens
    want = load_file(str(run_a / "checkpoints" / "step_18" / "model.safetensors"))
    got = load_file(str(run_b / "checkpoints" / "step_18" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
