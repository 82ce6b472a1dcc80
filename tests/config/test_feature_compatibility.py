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
