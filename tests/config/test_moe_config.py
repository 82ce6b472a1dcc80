"""model.moe compatibility rules: contradictions are errors naming the key and the fix."""

import pytest

from Ava.config import EnhancedTrainingConfig, check_compatibility
from Ava.errors import AvaConfigError


def _issues(**moe):
    cfg = EnhancedTrainingConfig.model_validate({"model": {"num_experts": 8, "moe": moe}})
    return {(i.key, i.severity): i.message for i in check_compatibility(cfg)}


def test_valid_moe_options_have_no_errors():
    issues = _issues(router="sigmoid", n_groups=4, topk_groups=2, aux_free_bias=True, num_shared_experts=1,
                     capacity_factor=1.25, eval_capacity_factor=2.0, seq_aux_loss_coef=1e-4, moe_every=2)
    assert not [k for k in issues if k[1] == "error"], issues


@pytest.mark.parametrize("moe, key, text", [
    ({"router": "expert_choice"}, "model.moe.capacity_factor", "expert_choice needs a capacity factor"),
    ({"router": "switch"}, "model.moe.top_k", "set top_k: 1"),
    ({"n_groups": 3, "topk_groups": 2}, "model.moe.n_groups", "not divisible by n_groups=3"),
    ({"n_groups": 4}, "model.moe.topk_groups", "needs both"),
    ({"n_groups": 4, "topk_groups": 5}, "model.moe.topk_groups", "more than n_groups"),
    ({"n_groups": 4, "topk_groups": 1, "top_k": 4}, "model.moe.topk_groups", "fewer than top_k=4"),
    ({"router": "hash", "n_groups": 4, "topk_groups": 2}, "model.moe.n_groups", "not hash"),
    ({"router": "hash", "aux_free_bias": True}, "model.moe.aux_free_bias", "router hash"),
])
def test_contradictions_are_errors(moe, key, text):
    issues = _issues(**moe)
    assert (key, "error") in issues, issues
    assert text in issues[(key, "error")]


def test_risky_combinations_warn():
    assert ("model.moe.router", "warning") in _issues(router="expert_choice", capacity_factor=1.0)
    assert ("model.moe.eval_capacity_factor", "warning") in _issues(eval_capacity_factor=2.0)
    assert ("model.moe.moe_every", "warning") in _issues(moe_every=9)


def test_the_model_refuses_an_invalid_moe_config():
    from Ava.config import ModelConfig
    from Ava.models import EnhancedMoEModel

    with pytest.raises(AvaConfigError, match="capacity factor"):
        EnhancedMoEModel(ModelConfig(vocab_size=32, hidden_size=32, num_experts=4,
                                     moe={"router": "expert_choice"}))
