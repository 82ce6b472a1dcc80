"""Routing diagnostics on hand-made counts, the collapse alarm, and their wiring into the trainer."""

import json
import logging
import math
import types

import pytest
import torch

from Ava.config import EnhancedTrainingConfig, MoEAlarmConfig
from Ava.errors import AvaTrainingError
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.metrics import (
    MoECollapseAlarm,
    dead_experts,
    load_entropy,
    max_vio,
    moe_diagnostics,
    token_drop_rate,
)
from Ava.training.run_manager import check_resume_config
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config


def test_values_on_hand_made_counts():
    counts = torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0], [8, 4, 4, 0]])
    torch.testing.assert_close(max_vio(counts), torch.tensor([0.0, 3.0, 1.0]))
    ent = load_entropy(counts)
    torch.testing.assert_close(ent[:2], torch.tensor([1.0, 0.0]))
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert ent[2].item() == pytest.approx(expected)
    assert dead_experts(counts).tolist() == [0, 3, 1]
    assert token_drop_rate(torch.tensor(3), 12).item() == pytest.approx(0.25)


def test_one_convention_for_empty_layers_and_a_single_expert():
    """A layer that routed nothing is not a violation (MaxVio 0) and has no spread (entropy 0, shares 0);
    one expert is trivially balanced (MaxVio 0, entropy 1)."""
    from Ava.models.routing_metrics import load_shares

    empty = torch.zeros(2, 4, dtype=torch.long)
    assert max_vio(empty).tolist() == [0.0, 0.0] and load_entropy(empty).tolist() == [0.0, 0.0]
    assert load_shares(empty).sum().item() == 0.0 and dead_experts(empty).tolist() == [4, 4]
    single = torch.tensor([[7], [3]])
    assert max_vio(single).tolist() == [0.0, 0.0] and load_entropy(single).tolist() == [1.0, 1.0]


def test_training_metrics_and_the_eval_report_read_the_same_numbers():
    """RoutingTotals (ava eval's per-layer table) and moe_diagnostics (metrics.jsonl) agree per layer."""
    from types import SimpleNamespace

    from Ava.models.routing_metrics import RoutingTotals

    def stats(layer, counts, entropy):
        return SimpleNamespace(layer=layer, tokens_per_expert=torch.tensor(counts), dropped_tokens=torch.tensor(0),
                               router_entropy=torch.tensor(entropy), logit_norm=torch.tensor(1.0),
                               unrouted_tokens=None, num_tokens=None)

    totals = RoutingTotals()
    totals.add([stats(1, [6, 2, 0, 0], 0.5), stats(3, [2, 2, 2, 2], 1.0)])
    totals.add([stats(1, [2, 2, 0, 0], 0.7), stats(3, [4, 0, 2, 2], 1.2)])
    metrics, layers = totals.metrics(), totals.per_layer()
    assert metrics["expert_load_layers"] == [1, 3] and sorted(layers) == [1, 3]
    for layer, row in zip((1, 3), metrics["expert_load"]):
        assert layers[layer]["load_shares"] == row
        assert layers[layer]["max_vio"] == metrics[f"moe/l{layer}/max_vio"]
        assert layers[layer]["load_entropy"] == metrics[f"moe/l{layer}/load_entropy"]
    assert layers[1]["dead_experts"] == [2, 3] and layers[3]["dead_experts"] == []
    assert metrics["dead_experts"] == 2.0 and metrics["max_vio"] == pytest.approx((8 / 3 - 1 + 6 / 4 - 1) / 2)
    # router entropy: each batch's value, batches weighted equally
    assert layers[1]["router_entropy"] == pytest.approx(0.6) and layers[3]["router_entropy"] == pytest.approx(1.1)
    assert metrics["router_entropy"] == pytest.approx((0.6 + 1.1) / 2)


def test_moe_diagnostics_summary():
    loads = [torch.tensor([4, 4, 4, 4]), torch.tensor([16, 0, 0, 0])]
    acc = {"dropped": torch.tensor([0, 8]), "router_entropy": torch.tensor([2.0, 1.0]),
           "router_logit_norm": torch.tensor([4.0, 8.0]), "batches": torch.tensor(2.0)}
    d = {k: float(v) for k, v in moe_diagnostics(loads, acc).items()}
    assert d["max_vio"] == pytest.approx(1.5) and d["max_vio_worst"] == pytest.approx(3.0)
    assert d["load_entropy"] == pytest.approx(0.5) and d["dead_experts"] == 3
    assert d["token_drop_rate"] == pytest.approx(8 / 32)
    assert d["router_entropy"] == pytest.approx(0.75) and d["router_logit_norm"] == pytest.approx(3.0)
    assert d["moe/l1/max_vio"] == pytest.approx(3.0) and d["moe/l0/load_entropy"] == pytest.approx(1.0)
    assert moe_diagnostics([]) == {}


def test_alarm_warns_on_max_vio_after_patience(caplog):
    alarm = MoECollapseAlarm(MoEAlarmConfig(max_vio=2.0, patience=2))
    skewed, fine = [torch.tensor([16, 0, 0, 0])], [torch.tensor([5, 4, 4, 3])]
    with caplog.at_level(logging.WARNING):
        assert alarm.on_step(1, skewed) is None  # 1 of 2
        assert alarm.on_step(2, fine) is None  # resets
        assert alarm.on_step(3, skewed) is None
        message = alarm.on_step(4, skewed)
    assert message and "MaxVio 3.00 > 2.0 in layer 0" in message
    assert "MoE collapse alarm at step 4" in caplog.text


def test_alarm_counts_dead_experts_over_the_window_and_can_stop():
    cfg = MoEAlarmConfig(dead_experts=2, window=3, action="stop")
    alarm = MoECollapseAlarm(cfg)
    # Experts 2 and 3 unused for 3 steps; expert 1 used once inside the window -> alive.
    assert alarm.on_step(1, [torch.tensor([5, 0, 0, 0])]) is None
    assert alarm.on_step(2, [torch.tensor([4, 1, 0, 0])]) is None  # window not yet full
    assert alarm.stop_reason is None
    message = alarm.on_step(3, [torch.tensor([5, 0, 0, 0])])
    assert "2 experts got no token in the last 3 steps" in message
    assert alarm.stop_reason.startswith(message) and "set action: warn" in alarm.stop_reason


def test_alarm_warns_at_most_once_per_window(caplog):
    alarm = MoECollapseAlarm(MoEAlarmConfig(max_vio=1.0, window=3))
    skewed, fine = [torch.tensor([9, 0, 0, 0])], [torch.tensor([2, 2, 3, 2])]
    pattern = [skewed] * 4 + [fine, skewed] * 2 + [fine] * 3 + [skewed]  # steps 1-4, 6, 8, 12 fire
    with caplog.at_level(logging.WARNING):
        fired = [alarm.on_step(step, loads) is not None for step, loads in enumerate(pattern, start=1)]
    assert [step for step, f in enumerate(fired, start=1) if f] == [1, 2, 3, 4, 6, 8, 12]  # each returns
    warned = [r.getMessage() for r in caplog.records if "collapse alarm" in r.getMessage()]
    assert [m.split(":")[0].rsplit(" ", 1)[1] for m in warned] == ["1", "4", "8", "12"]
    assert "and 2 more firing(s) since step 1" in warned[1]  # steps 2 and 3
    assert "and 1 more firing(s) since step 4" in warned[2]  # step 6
    assert "more firing" not in warned[3]
    assert alarm.stop_reason is None


def test_alarm_respects_start_step_and_is_off_by_default():
    assert not MoECollapseAlarm(MoEAlarmConfig()).active
    alarm = MoECollapseAlarm(MoEAlarmConfig(max_vio=0.5, start_step=10))
    assert alarm.on_step(5, [torch.tensor([9, 0])]) is None
    assert alarm.on_step(10, [torch.tensor([9, 0])]) is not None
    state = alarm.state_dict()
    fresh = MoECollapseAlarm(MoEAlarmConfig(max_vio=0.5, start_step=10))
    fresh.load_state_dict(state)
    assert fresh.state_dict()["violations"] == 1


def _trainer(**overrides) -> EnhancedModularTrainer:
    data = {"model": {"vocab_size": 40, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_experts": 4,
                      "max_seq_len": 16, "moe": {"top_k": 2, "moe_intermediate_size": 32,
                                                 **overrides.get("moe", {})}, **overrides.get("model", {})},
            "training": {"moe_alarm": overrides.get("alarm", {}), "eval_batches": 2, "batch_size": 2},
            "run": {"device": "cpu"}}
    config = EnhancedTrainingConfig.model_validate(data)
    torch.manual_seed(0)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    return trainer


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (2, 16), generator=g) for _ in range(n)]


def test_train_step_reports_diagnostics_and_updates_the_expert_bias():
    trainer = _trainer(moe={"router": "sigmoid", "aux_free_bias": True, "capacity_factor": 1.0,
                            "global_aux_loss_coef": 0.01})
    metrics = trainer.train_step(_batches(2))
    for key in ("max_vio", "max_vio_worst", "load_entropy", "dead_experts", "token_drop_rate",
                "router_entropy", "router_logit_norm", "moe/l0/max_vio", "moe/l1/load_entropy",
                "global_load_balance"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["token_drop_rate"]) < 1.0
    assert float(metrics["router_entropy"]) <= math.log(4) + 1e-6
    bias = trainer.model.layers[0].mlp.gate.expert_bias
    assert bias.abs().sum() > 0  # one γ step (1e-3) per expert, up or down, after optimizer.step()
    assert all(v == 0.0 or v == pytest.approx(1e-3) for v in bias.abs().tolist())
    # evaluate() carries the same diagnostics.
    trainer.data = types.SimpleNamespace(val=torch.randint(0, 40, (6, 16)))
    val = trainer.evaluate()
    assert {"max_vio", "dead_experts", "router_entropy", "token_drop_rate"} <= set(val)
    assert all(isinstance(v, float) for k, v in val.items() if not k.startswith("expert_load"))


def test_layers_are_named_by_decoder_index_everywhere(caplog):
    """With a dense first layer and an MTP block, the MoE layers are decoder layers 1 and 2 (the MTP
    block) in the step's metrics, the validation load histogram, the alarm and the report's labels."""
    from Ava.training.report import layer_labels

    trainer = _trainer(moe={"first_dense_layers": 1}, model={"mtp": {"num_heads": 1}}, alarm={"max_vio": 1e-6})
    with caplog.at_level(logging.WARNING):
        metrics = trainer.train_step(_batches(1))
    assert {k for k in metrics if k.startswith("moe/")} == {
        "moe/l1/max_vio", "moe/l1/load_entropy", "moe/l2/max_vio", "moe/l2/load_entropy"}
    worst = max((1, 2), key=lambda layer: float(metrics[f"moe/l{layer}/max_vio"]))
    assert f"in layer {worst} " in caplog.text
    trainer.data = types.SimpleNamespace(val=torch.randint(0, 40, (4, 16)))
    val = trainer.evaluate()
    assert val["expert_load_layers"] == [1, 2] and len(val["expert_load"]) == 2
    assert layer_labels(val["expert_load_layers"], num_layers=2) == ["layer 1", "MTP 1"]


def test_alarm_stop_logs_and_checkpoints_the_step_that_fired(tmp_path, corpus_cache):
    """action: stop ends train() with AvaTrainingError only after that step is in metrics.jsonl, in a
    checkpoint and in summary.json."""
    config = tiny_config(tmp_path / "runs", corpus_cache, "training.moe_alarm.max_vio=1e-6",
                         "training.moe_alarm.patience=3", "training.moe_alarm.action=stop",
                         "training.log_every=100", "training.eval_every=2", "training.save_every=3",
                         "evaluation.sample_max_new_tokens=0")
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    with pytest.raises(AvaTrainingError, match=r"MoE collapse alarm at step 3: .*set action: warn .*step_3"):
        trainer.train()
    root = trainer.paths.root
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3]  # logged although log_every is 100
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 3]  # and evaluated, off eval_every
    assert load_training_state(root / "checkpoints" / "step_3")["step"] == 3
    manifest = json.loads((root / "checkpoints" / "step_3" / "manifest.json").read_text())
    assert manifest["val_loss"] == pytest.approx([r["loss"] for r in records if r["split"] == "val"][-1])
    summary = json.loads((root / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped_by_alarm"].startswith("MoE collapse alarm at step 3")
    # the alarm only watches: --resume may continue with other alarm settings
    relaxed = config.model_copy(update={"training": config.training.model_copy(update={
        "moe_alarm": config.training.moe_alarm.model_copy(update={"action": "warn"})})})
    assert check_resume_config(root, relaxed) == ["training.moe_alarm.action: 'stop' -> 'warn'"]


def test_unrouted_rate_counts_tokens_no_expert_computed():
    """Expert-choice leaves some tokens without any expert: unrouted_rate reports them (token_drop_rate,
    which counts dropped slots, stays 0); dropless top-k routes every token."""
    choice = _trainer(moe={"router": "expert_choice", "capacity_factor": 0.5})  # 32 slots for 32 tokens
    metrics = choice.train_step(_batches(1))
    model = choice.model
    with torch.no_grad():
        out = model(_batches(1)[0])
    stats = out.router_stats[0]
    assert stats.num_tokens == 32 and 0 < int(stats.unrouted_tokens) < 32
    assert 0.0 < float(metrics["unrouted_rate"]) < 1.0 and float(metrics["token_drop_rate"]) == 0.0
    assert float(_trainer().train_step(_batches(1))["unrouted_rate"]) == 0.0
    # top-k with capacity: a token whose every choice overflowed is unrouted, summed over micro-batches
    tight = _trainer(moe={"capacity_factor": 0.25}).train_step(_batches(3))  # 16 of 64 slots kept
    assert 0.0 < float(tight["unrouted_rate"]) < 1.0 and float(tight["token_drop_rate"]) > 0.5
