"""Config schema: defaults, derivation, YAML round trip, overrides, errors with suggestions."""

from pathlib import Path

import pytest
import yaml

from Ava.config import EnhancedTrainingConfig, apply_override, check_compatibility, load_config
from Ava.errors import AvaConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_seed_minimal_yaml_derives_every_size(tmp_path):
    path = write(tmp_path, {"model": {"hidden_size": 768, "num_layers": 12, "num_experts": 8},
                            "training": {"batch_size": 32, "learning_rate": 0.001, "num_epochs": 10}})
    cfg = EnhancedTrainingConfig.from_yaml(path)
    m = cfg.model
    assert (m.num_heads, m.num_kv_heads) == (12, 12)
    assert m.intermediate_size == m.moe.moe_intermediate_size == 2048  # 8/3·768
    assert m.vocab_size == cfg.data.tokenizer.vocab_size
    assert cfg.data.seq_len == m.max_seq_len
    assert cfg.training.batch_size == 32 and cfg.training.num_epochs == 10


def test_yaml_round_trip_is_identical(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    again = EnhancedTrainingConfig.from_yaml(write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg


def test_overrides_are_coerced_to_field_types(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["training.learning_rate=3e-4", "model.moe.top_k=1", "optimizer.betas=[0.9, 0.99]",
                       "training.max_steps=null", "model.moe.backend=loop"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.model.moe.top_k == 1
    assert cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.training.max_steps is None
    assert cfg.model.moe.backend == "loop"


def test_override_into_list_item():
    data = {"data": {"sources": [{"path": "a.txt"}]}}
    apply_override(data, "data.sources.0.path=b.txt")
    assert data["data"]["sources"][0]["path"] == "b.txt"
    with pytest.raises(AvaConfigError, match="index"):
        apply_override(data, "data.sources.3.path=c.txt")


@pytest.mark.parametrize("override, expected", [
    ("model.hidden_sise=64", "did you mean 'model.hidden_size'"),
    ("training.lerning_rate=0.1", "did you mean 'training.learning_rate'"),
    ("modle.hidden_size=64", "did you mean 'model'"),
    ("model.moe.topk=2", "did you mean 'model.moe.top_k'"),
])
def test_typo_suggests_nearest_key(override, expected):
    with pytest.raises(AvaConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_values_name_the_key_and_all_problems_at_once(tmp_path):
    path = write(tmp_path, {"model": {"hidden_size": 4, "moe": {"backend": "fast"}}})
    with pytest.raises(AvaConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.hidden_size" in message and "greater than or equal to 8" in message
    assert "model.moe.backend" in message and "'grouped' or 'auto'" in message


@pytest.mark.parametrize("model, key", [
    ({"num_experts": 2, "moe": {"top_k": 3}}, "model.moe.top_k"),
    ({"hidden_size": 100, "num_heads": 3}, "model.num_heads"),
    ({"hidden_size": 96, "num_heads": 4, "num_kv_heads": 3}, "model.num_kv_heads"),
    ({"hidden_size": 80, "num_heads": 16}, "RoPE"),
    ({"num_layers": 2, "moe": {"first_dense_layers": 3}}, "model.moe.first_dense_layers"),
])
def test_compatibility_rules_reject_contradictions(tmp_path, model, key):
    with pytest.raises(AvaConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, {"model": model}))


def test_missing_data_path_and_tokenizer_are_reported(tmp_path):
    path = write(tmp_path, {"data": {"sources": [{"path": str(tmp_path / "nope.txt")}],
                                     "tokenizer": str(tmp_path / "tok.json")}})
    with pytest.raises(AvaConfigError) as err:
        load_config(path)
    assert "data.sources.0.path" in str(err.value) and "data.tokenizer.path" in str(err.value)
    # Without the environment check the same config loads (e.g. to inspect it elsewhere).
    assert load_config(path, check_environment=False).data.sources[0].path.endswith("nope.txt")


def test_cuda_requested_without_cuda_is_an_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(AvaConfigError, match="run.device"):
        load_config(write(tmp_path, {"run": {"device": "cuda"}}))


def test_bf16_where_unsupported(monkeypatch):
    import torch

    cfg = EnhancedTrainingConfig.model_validate({"precision": {"dtype": "bf16"}, "run": {"device": "cpu"}})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    issues = check_compatibility(cfg, environment=True)
    assert [i.severity for i in issues if i.key == "precision.dtype"] == ["warning"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    cfg = EnhancedTrainingConfig.model_validate({"precision": {"dtype": "bf16"}, "run": {"device": "cuda"}})
    issues = check_compatibility(cfg, environment=True)
    assert [i.severity for i in issues if i.key == "precision.dtype"] == ["error"]


def test_invalid_yaml_and_wrong_top_level(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: 64\n")
    with pytest.raises(AvaConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(AvaConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(AvaConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
