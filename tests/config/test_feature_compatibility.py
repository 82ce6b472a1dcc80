"""Cross-section data rules of config/feature_compatibility.py."""


def test_streaming_rules_name_the_key_and_the_fix(tmp_path):
    from Ava.config import EnhancedTrainingConfig, check_compatibility

    source = tmp_path / "a.jsonl"
    source.write_text('{"text": "hi"}\n')
    cfg = EnhancedTrainingConfig.from_dict({
        "data": {"streaming": True, "dedup": "exact", "sources": [{"path": str(source)}]},
    })
    problems = {issue.key: issue.message for issue in check_compatibility(cfg)}
    assert "training.max_steps" in problems and "set training.max_steps" in problems["training.max_steps"]
    assert "data.dedup" in problems and "ava prepare" in problems["data.dedup"]


def test_full_qk_norm_scope_without_qk_norm_warns():
    from Ava.config import EnhancedTrainingConfig, check_compatibility

    cfg = EnhancedTrainingConfig.from_dict({"model": {"qk_norm": False, "qk_norm_scope": "full"}})
    issues = [issue for issue in check_compatibility(cfg) if issue.key == "model.qk_norm_scope"]
    assert len(issues) == 1 and issues[0].severity == "warning" and "qk_norm: true" in issues[0].message


def test_one_data_origin_and_one_renderer_are_reported_with_every_other_problem(tmp_path):
    """Formerly pydantic validators (so they hid the other problems): now rules, all reported at once."""
    import pytest
    import yaml

    from Ava.config import load_config, validate_config
    from Ava.errors import AvaConfigError

    source = {"path": "a.jsonl", "template": {"prompt": "{q}", "response": "{a}"}, "chat": {}}
    data = {"model": {"num_experts": 2, "moe": {"top_k": 3}}, "data": {"prepared": "shards", "sources": [source]}}
    validate_config(data)  # the schema alone accepts it
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(AvaConfigError) as err:
        load_config(path, check_environment=False)
    message = str(err.value)
    assert "model.moe.top_k: 3 is more than model.num_experts=2" in message
    assert "data: set either data.prepared (shards from `ava prepare`) or data.sources, not both" in message
    assert "data.sources.0: set either template or chat on a source, not both" in message
    streaming = {"data": {"prepared": "shards", "streaming": True}, "training": {"max_steps": 5}}
    path.write_text(yaml.safe_dump(streaming))
    with pytest.raises(AvaConfigError, match=r"c\.yaml: data: data\.streaming reads data\.sources; prepared shards "
                                             r"are already memory-mapped$"):
        load_config(path, check_environment=False)


def test_a_bare_model_config_without_vocab_size_is_an_issue():
    from Ava.config import ModelConfig
    from Ava.config.feature_compatibility import model_issues, tokenizer_vocab_issues

    issues = model_issues(ModelConfig())
    assert str(issues[0]).startswith("model.vocab_size: unset; set it")
    assert model_issues(ModelConfig(vocab_size=64)) == []
    assert str(tokenizer_vocab_issues(64, 100)[0]) == (
        "model.vocab_size: 64 is smaller than the tokenizer's 100 tokens; raise it or set null")
    assert tokenizer_vocab_issues(100, 100) == []


def test_resume_changes_allow_observation_keys_and_refuse_the_rest():
    import pytest

    from Ava.config import EnhancedTrainingConfig
    from Ava.config.feature_compatibility import resume_changes
    from Ava.errors import AvaConfigError

    saved = EnhancedTrainingConfig().to_dict()
    del saved["model"]["head_dim"]  # a key added later takes its default: no change
    new = EnhancedTrainingConfig.from_dict({"training": {"eval_every": 7}})
    assert resume_changes(saved, new, "runs/x") == ["training.eval_every: 100 -> 7"]
    changed = EnhancedTrainingConfig.from_dict({"training": {"learning_rate": 0.5}})
    with pytest.raises(AvaConfigError, match=r"^cannot resume runs/x with a changed training\.learning_rate: "
                                             r"0\.001 -> 0\.5: these change what training computes"):
        resume_changes(saved, changed, "runs/x")


def test_a_cpu_low_precision_without_native_matmuls_is_warned_about(monkeypatch):
    import torch

    from Ava.config import EnhancedTrainingConfig, check_compatibility

    for dtype, native, warned in (("bf16", False, True), ("bf16", True, False), ("fp16", False, True),
                                  ("fp32", False, False)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda native=native: native)
        cfg = EnhancedTrainingConfig.from_dict({"precision": {"dtype": dtype}, "run": {"device": "cpu"}})
        issues = [i for i in check_compatibility(cfg, environment=True) if i.key == "precision.dtype"]
        assert len(issues) == int(warned), (dtype, native)
        if warned:
            assert issues[0].severity == "warning"
            assert f"no native {dtype} matmuls" in issues[0].message
            assert "use precision.dtype: fp32" in issues[0].message
