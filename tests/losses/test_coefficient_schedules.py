"""Balancing-coefficient schedules: values per kind, validation, the model's terms, the trainer, resume."""

import json
import math
from pathlib import Path

import pytest
import torch

from Ava.config import ModelConfig, check_compatibility, load_config, validate_config
from Ava.config.feature_compatibility import model_loss_terms
from Ava.config.model_config import CoefSchedule
from Ava.errors import AvaConfigError
from Ava.losses import BALANCING_COEFFICIENTS, balancing_coefficients, scheduled_value
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from tests.conftest import tiny_config

# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("schedule", "base", "expected"), [
    # (step: value) at 0, mid, end, after
    ({"kind": "linear", "start": 0.1, "steps": 1000}, 0.01, {0: 0.1, 500: 0.055, 1000: 0.01, 5000: 0.01}),
    ({"kind": "linear", "steps": 10}, 0.02, {0: 0.0, 5: 0.01, 10: 0.02, 11: 0.02}),  # start 0: a warmup
    ({"kind": "cosine", "start": 0.001, "steps": 2000}, 0.0,
     {0: 0.001, 500: 0.0005 * (1 + math.cos(math.pi / 4)), 1000: 0.0005, 2000: 0.0, 3000: 0.0}),
    ({"kind": "step", "start": 0.001, "steps": 5000, "end": 0.0}, 1e-3,
     {0: 0.001, 2500: 0.001, 4999: 0.001, 5000: 0.0, 9000: 0.0}),
    ({"kind": "linear", "start": 0.5, "steps": 4, "end": 0.1}, 0.01, {0: 0.5, 2: 0.3, 4: 0.1, 6: 0.1}),
    ({"kind": "constant", "start": 0.7, "steps": 3}, 0.01, {0: 0.01, 3: 0.01, 100: 0.01}),  # start ignored
    ({"kind": "constant", "end": 0.2}, 0.01, {0: 0.2, 100: 0.2}),
])
def test_each_kind_at_start_middle_end_and_after(schedule, base, expected):
    sched = CoefSchedule(**schedule)
    for step, value in expected.items():
        assert scheduled_value(sched, base, step) == pytest.approx(value, abs=1e-15), step
    # the base coefficient (or end) is the exact value once the schedule is over
    assert scheduled_value(sched, base, 10**9) == (base if sched.end is None else sched.end)


def test_no_schedule_is_the_constant_coefficient_and_cosine_is_monotone():
    assert scheduled_value(None, 0.03, 0) == scheduled_value(None, 0.03, 10**6) == 0.03
    cosine = CoefSchedule(kind="cosine", start=1.0, steps=50, end=0.0)
    values = [scheduled_value(cosine, 0.5, s) for s in range(52)]
    assert all(a > b for a, b in zip(values[:50], values[1:51])) and values[50] == values[51] == 0.0


def test_all_five_coefficients_come_back_and_scheduled_only_filters():
    moe = validate_config({"model": {"moe": {"aux_loss_coef": 0.01, "coef_schedules": {
        "aux_loss_coef": {"kind": "linear", "start": 0.1, "steps": 10},
        "bias_update_rate": {"kind": "step", "start": 0.001, "steps": 5, "end": 0.0},
    }}}}).model.moe
    at0 = balancing_coefficients(moe, 0)
    assert tuple(at0) == BALANCING_COEFFICIENTS
    assert at0 == {"aux_loss_coef": 0.1, "seq_aux_loss_coef": 0.0, "global_aux_loss_coef": 0.0,
                   "z_loss_coef": 0.001, "bias_update_rate": 0.001}
    assert balancing_coefficients(moe, 7, scheduled_only=True) == pytest.approx(
        {"aux_loss_coef": 0.037, "bias_update_rate": 0.0})


# -- validation ------------------------------------------------------------------------------


def test_the_documented_yaml_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n"
        "  moe:\n"
        "    aux_loss_coef: 0.01\n"
        "    aux_free_bias: true\n"
        "    coef_schedules:\n"
        "      aux_loss_coef: {kind: linear, start: 0.1, steps: 1000}\n"
        "      bias_update_rate: {kind: step, start: 0.001, steps: 5000, end: 0.0}\n"
        "      z_loss_coef: {kind: cosine, start: 0.001, steps: 2000}\n"
    )
    schedules = load_config(path, check_environment=False).model.moe.coef_schedules
    assert schedules.aux_loss_coef == CoefSchedule(kind="linear", start=0.1, steps=1000)
    assert schedules.bias_update_rate.end == 0.0 and schedules.seq_aux_loss_coef is None
    overridden = load_config(path, ["model.moe.coef_schedules.aux_loss_coef.kind=constant"],
                             check_environment=False)
    assert balancing_coefficients(overridden.model.moe, 0)["aux_loss_coef"] == 0.01  # switched off


@pytest.mark.parametrize(("schedules", "message"), [
    ({"aux_coef": {"kind": "linear", "steps": 3}},
     "unknown key 'model.moe.coef_schedules.aux_coef'; did you mean 'model.moe.coef_schedules.aux_loss_coef'?"),
    ({"router_loss": {"kind": "linear", "steps": 3}},
     "valid keys in 'model.moe.coef_schedules': aux_loss_coef, bias_update_rate, global_aux_loss_coef, "
     "seq_aux_loss_coef, z_loss_coef"),
    ({"aux_loss_coef": {"kind": "linear", "start": 0.1}},
     "model.moe.coef_schedules.aux_loss_coef: kind linear needs steps; set steps: N"),
    ({"aux_loss_coef": {"kind": "cosine", "steps": 0}},
     "model.moe.coef_schedules.aux_loss_coef.steps: input should be greater than or equal to 1 (got 0)"),
    ({"z_loss_coef": {"kind": "exponential", "steps": 3}},
     "model.moe.coef_schedules.z_loss_coef.kind: input should be 'constant', 'linear', 'cosine' or 'step'"),
    ({"z_loss_coef": {"kind": "linear", "steps": 3, "start": -1.0}},
     "model.moe.coef_schedules.z_loss_coef.start: input should be greater than or equal to 0"),
    ({"z_loss_coef": {"kind": "linear", "steps": 3, "stop": 0.0}},
     "unknown key 'model.moe.coef_schedules.z_loss_coef.stop'"),
])
def test_invalid_schedules_name_the_key_and_the_fix(schedules, message):
    with pytest.raises(AvaConfigError) as err:
        validate_config({"model": {"moe": {"coef_schedules": schedules}}})
    assert message in str(err.value)


def test_a_gamma_schedule_without_the_bias_is_a_warning():
    config = validate_config({"model": {"vocab_size": 64, "moe": {
        "coef_schedules": {"bias_update_rate": {"kind": "step", "start": 0.01, "steps": 3, "end": 0.0}}}}})
    warnings = [i for i in check_compatibility(config) if i.key == "model.moe.coef_schedules.bias_update_rate"]
    assert len(warnings) == 1 and warnings[0].severity == "warning"


# -- the model -------------------------------------------------------------------------------


def _model(**moe) -> EnhancedMoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_experts=4,
                      max_seq_len=16, moe={"top_k": 2, "moe_intermediate_size": 32, **moe})
    return EnhancedMoEModel(cfg)


def test_a_term_zero_at_base_but_scheduled_is_computed_and_weighted_by_the_step_value():
    model = _model(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0, coef_schedules={
        "aux_loss_coef": {"kind": "linear", "start": 0.5, "steps": 4},
        "seq_aux_loss_coef": {"kind": "step", "start": 0.2, "steps": 2},
    })
    assert model_loss_terms(model.config) == ["lm_loss", "load_balance", "seq_load_balance"]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for step, aux_coef, seq_coef in [(0, 0.5, 0.2), (2, 0.25, 0.0), (4, 0.0, 0.0), (9, 0.0, 0.0)]:
        model.set_balancing_step(step)
        out = model(ids, labels=ids)
        raw = torch.stack([s.aux_loss for s in out.router_stats]).mean()
        assert set(out.aux_losses) == {"load_balance", "seq_load_balance"}  # the same terms at every step
        torch.testing.assert_close(out.aux_losses["load_balance"], aux_coef * raw)
        assert (out.aux_losses["seq_load_balance"] > 0) == (seq_coef > 0)
        torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))


def test_a_coefficient_zero_throughout_leaves_its_term_out():
    model = _model(aux_loss_coef=0.0, z_loss_coef=0.0,
                   coef_schedules={"aux_loss_coef": {"kind": "constant"}, "z_loss_coef": {"kind": "step", "steps": 3}})
    assert model_loss_terms(model.config) == ["lm_loss"]
    ids = torch.randint(0, 64, (2, 8))
    assert model(ids, labels=ids).aux_losses == {}


def test_update_expert_bias_uses_the_scheduled_gamma():
    model = _model(aux_free_bias=True,
                   coef_schedules={"bias_update_rate": {"kind": "linear", "start": 0.01, "steps": 2, "end": 0.0}})
    load = [torch.tensor([10, 0, 3, 3]), torch.tensor([4, 4, 4, 4])]
    gate = model.layers[0].mlp.gate
    model.update_expert_bias(load)  # step 0: γ = 0.01
    torch.testing.assert_close(gate.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    model.set_balancing_step(1)  # γ = 0.005
    model.update_expert_bias(load)
    torch.testing.assert_close(gate.expert_bias, torch.tensor([-0.015, 0.015, 0.015, 0.015]))
    model.set_balancing_step(2)  # γ = 0: no change
    model.update_expert_bias(load)
    torch.testing.assert_close(gate.expert_bias, torch.tensor([-0.015, 0.015, 0.015, 0.015]))
    assert torch.count_nonzero(model.layers[1].mlp.gate.expert_bias) == 0  # uniform load: sign 0


# -- the trainer -----------------------------------------------------------------------------

AUX = [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]  # linear 0.5 → 0 over 4 steps, at steps 0..5
GAMMA = [0.01, 0.01, 0.01, 0.0, 0.0, 0.0]  # step: 0.01 for 3 steps, then 0
SCHEDULED = (
    "model.moe.aux_loss_coef=0", "model.moe.aux_free_bias=true",
    "model.moe.coef_schedules.aux_loss_coef={kind: linear, start: 0.5, steps: 4}",
    "model.moe.coef_schedules.bias_update_rate={kind: step, start: 0.01, steps: 3, end: 0.0}",
    "training.log_every=2", "training.eval_every=100",
    "evaluation.sample_max_new_tokens=0", "logging.tensorboard=false",
)


class _Recorder(EnhancedModularTrainer):
    """Records, per finished step, the metrics, the training forwards' terms and the expert biases."""

    def __init__(self, model, config):
        super().__init__(model, config)
        self.metrics, self.forwards, self.biases = {}, {}, {}
        model.register_forward_hook(self._on_forward)

    def _biases(self):
        return [layer.mlp.gate.expert_bias.clone() for layer in self.model.layers if layer.is_moe]

    def _on_forward(self, module, inputs, out):
        if module.training:
            raw = torch.stack([s.aux_loss for s in out.router_stats]).mean()
            self.forwards.setdefault(self.step + 1, []).append({
                "coef": module.balancing_coefficients()["aux_loss_coef"],
                "load_balance": out.aux_losses["load_balance"].detach(), "raw": raw,
                "loss": out.loss.detach(), "sum": (out.lm_loss + sum(out.aux_losses.values())).detach(),
            })

    def train_step(self, micro_batches, timer=None):
        self.biases.setdefault(self.step, self._biases())
        metrics = super().train_step(micro_batches, timer)
        self.metrics[self.step], self.biases[self.step] = dict(metrics), self._biases()
        return metrics


def _train(out_dir, cache, *overrides, resume=None):
    config = tiny_config(out_dir, cache, *SCHEDULED, *overrides)
    seed_everything(config.run.seed)
    trainer = _Recorder(EnhancedMoEModel(config.model), config)
    return trainer, trainer.train(resume=resume)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, corpus_cache):
    return _train(tmp_path_factory.mktemp("sched"), corpus_cache, "training.max_steps=6")


def test_the_trainer_logs_and_applies_the_aux_schedule(six_steps):
    trainer, summary = six_steps
    assert sorted(trainer.metrics) == [1, 2, 3, 4, 5, 6]
    assert all(m["skipped"] == 0.0 for m in trainer.metrics.values())
    assert [trainer.metrics[s]["coef/aux_loss_coef"] for s in range(1, 7)] == pytest.approx(AUX)
    assert [trainer.metrics[s]["coef/bias_update_rate"] for s in range(1, 7)] == pytest.approx(GAMMA)
    assert "coef/z_loss_coef" not in trainer.metrics[1]  # only scheduled coefficients are logged
    for step in range(1, 7):
        (fwd,) = trainer.forwards[step]
        assert fwd["coef"] == pytest.approx(AUX[step - 1])
        torch.testing.assert_close(fwd["load_balance"], AUX[step - 1] * fwd["raw"])
        torch.testing.assert_close(fwd["loss"], fwd["sum"])
        torch.testing.assert_close(trainer.metrics[step]["load_balance"], fwd["load_balance"].float())
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["coef/aux_loss_coef"] for r in records if r["split"] == "train"}
    assert logged == pytest.approx({2: AUX[1], 4: AUX[3], 6: AUX[5]})


def test_the_gamma_schedule_reaches_the_expert_bias(six_steps):
    trainer, _ = six_steps
    for step in range(1, 7):
        gamma = GAMMA[step - 1]
        for before, after in zip(trainer.biases[step - 1], trainer.biases[step], strict=True):
            delta = after - before
            if gamma == 0:
                assert torch.equal(after, before), f"bias moved at step {step} with γ = 0"
            else:  # every expert moves by ±γ (or 0 at exactly mean load), and some do
                assert torch.all(torch.isclose(delta.abs(), torch.tensor(gamma)) | (delta == 0))
                assert torch.count_nonzero(delta) > 0


def test_a_resumed_run_continues_the_schedule(tmp_path, corpus_cache, six_steps):
    reference, _ = six_steps
    _, first = _train(tmp_path, corpus_cache, "training.max_steps=3")
    resumed, summary = _train(tmp_path, corpus_cache, "training.max_steps=6", resume=first.run_dir)
    assert summary.resumed_from is not None and sorted(resumed.metrics) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.metrics[step]["coef/aux_loss_coef"] == pytest.approx(AUX[step - 1])
        assert resumed.metrics[step]["coef/aux_loss_coef"] == reference.metrics[step]["coef/aux_loss_coef"]
        assert resumed.forwards[step][0]["coef"] == pytest.approx(AUX[step - 1])
    # the first resumed step (s = 3) weights the aux term by 0.125, not the fresh model's 0.5 …
    torch.testing.assert_close(resumed.forwards[4][0]["load_balance"], 0.125 * resumed.forwards[4][0]["raw"])
    # … and γ = 0 from s = 3 on: the checkpointed bias stays as it was
    for before, after in zip(resumed.biases[3], resumed.biases[6], strict=True):
        assert torch.equal(before, after) and torch.count_nonzero(before) > 0
