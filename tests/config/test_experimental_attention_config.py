"""model.attention, model.moh, model.moa and model.cross_attention: defaults, derived sizes and
one-line errors that name the key and the fix."""

import pytest

from Ava.cli.main import main
from Ava.config import EnhancedTrainingConfig, ModelConfig, check_compatibility, load_config
from Ava.errors import AvaConfigError
from Ava.models import EnhancedMoEModel

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_defaults_and_derived_sizes():
    m = ModelConfig(vocab_size=64, hidden_size=64, num_heads=4)
    assert m.attention == "standard" and m.cross_attention.every == 0 and m.cross_attention.context_size == 64
    assert (m.moh.shared_heads, m.moh.top_k) == (0, 2)  # half of the 4 routed heads
    assert (m.moa.num_experts, m.moa.top_k) == (8, 4)  # 2 × heads, as many per token as heads
    assert ModelConfig(vocab_size=64, hidden_size=64, num_heads=4, moh={"shared_heads": 1}).moh.top_k == 2
    assert ModelConfig(vocab_size=64, hidden_size=64, num_heads=4, attention="moa").num_kv_heads == 1


@pytest.mark.parametrize("overrides, key, fix", [
    (["model.attention=moh", "model.moh.shared_heads=4"], "model.moh.shared_heads", "set shared_heads below num_heads"),
    (["model.attention=moh", "model.moh.top_k=5"], "model.moh.top_k", "set top_k ≤ 4"),
    (["model.attention=moh", "model.moh.shared_heads=1", "model.moh.top_k=4"], "model.moh.top_k", "set top_k ≤ 3"),
    (["model.attention=moa"], "model.num_kv_heads", "set num_kv_heads: 1"),
    (["model.attention=moa", "model.num_kv_heads=1", "model.moa.num_experts=4", "model.moa.top_k=6"],
     "model.moa.top_k", "set top_k ≤ num_experts"),
    (["model.attention=mixed"], "model.attention", "'standard', 'moh' or 'moa'"),
    (["model.moh.heads=2"], "model.moh.heads", "valid keys in 'model.moh': aux_loss_coef, shared_heads, top_k"),
    (["model.cross_attention.gate=tanh"], "model.cross_attention.gate", "valid keys"),
])
def test_bad_combinations_are_one_line_errors_naming_key_and_fix(tmp_path, overrides, key, fix):
    with pytest.raises(AvaConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={tmp_path}", *overrides])
    message = str(err.value)
    assert "\n" not in message and key in message and fix in message, message


def test_cli_config_check_reports_the_error_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden_size: 64, num_heads: 4, attention: moh, moh: {top_k: 9}}\n")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model.moh.top_k: 9" in err[0]


def test_warnings_every_routed_head_selected_and_no_cross_attention_layer():
    cfg = EnhancedTrainingConfig.from_dict({"model": {"hidden_size": 64, "num_heads": 4, "num_layers": 2,
                                                      "attention": "moh", "moh": {"top_k": 4},
                                                      "cross_attention": {"every": 3}}})
    issues = {issue.key: issue for issue in check_compatibility(cfg)}
    assert issues["model.moh.top_k"].severity == "warning" and "every routed head" in issues["model.moh.top_k"].message
    assert issues["model.cross_attention.every"].severity == "warning"


def test_the_model_refuses_a_bad_config_it_is_built_from():
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_heads=4, attention="moh", moh={"shared_heads": 4})
    with pytest.raises(AvaConfigError, match="model.moh.shared_heads: 4 leaves no routed head"):
        EnhancedMoEModel(cfg)


def test_the_balancing_term_can_be_named_by_uncertainty_weighting_and_surgery():
    ok = ModelConfig(vocab_size=64, hidden_size=64, num_heads=4, attention="moa",
                     loss={"uncertainty_weighting": ["lm_loss", "attention_balance"]})
    EnhancedMoEModel(ok)  # accepted
    with pytest.raises(AvaConfigError, match="attention_balance"):
        EnhancedMoEModel(ModelConfig(vocab_size=64, hidden_size=64, num_heads=4,
                                     loss={"uncertainty_weighting": ["attention_balance"]}))
