"""model.vocab_size and the tokenizer follow each other.

Set by the user, it is the target of the tokenizer Ava trains; left null, it is the tokenizer's
real size rounded up to a multiple of 64 (not the tokenizer's target), and a resumed run keeps the
size its checkpoints were saved with.
"""

import math

import pytest
import yaml

from Ava.config import check_compatibility, validate_config
from Ava.config.feature_compatibility import resume_changes
from Ava.config.training_config import adopt_tokenizer_vocab, resolve_vocab_size, round_vocab_size
from Ava.data import prepare_data
from Ava.errors import AvaConfigError
from Ava.training import EnhancedModularTrainer
from tests.conftest import REPO, tiny_config


def _tiny_without_tokenizer_size(tmp_path, cache, **model) -> dict:
    """configs/tiny.yaml as a dict, data.tokenizer.vocab_size left at its default (8,192)."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    del data["data"]["tokenizer"]
    data["data"]["cache_dir"] = str(cache)
    data["run"]["output_dir"] = str(tmp_path)
    data["model"].update(model)
    return data


def _first_lm_loss(trainer: EnhancedModularTrainer) -> float:
    return float(trainer.train_step(next(trainer.feed.optimizer_steps(1)))["lm_loss"])


def test_round_vocab_size():
    assert [round_vocab_size(n) for n in (1, 64, 65, 302, 484, 8192)] == [64, 64, 128, 320, 512, 8192]


def test_a_user_set_model_vocab_size_is_the_trained_tokenizers_target(tmp_path, corpus_cache):
    config = validate_config(_tiny_without_tokenizer_size(tmp_path, corpus_cache, vocab_size=300))
    assert config.data.tokenizer.vocab_size == 300
    assert [i for i in check_compatibility(config) if i.severity == "error"] == []
    # explicitly set, the tokenizer's size is the user's
    both = validate_config({"model": {"vocab_size": 1024}, "data": {"tokenizer": {"vocab_size": 512}}})
    assert both.data.tokenizer.vocab_size == 512 and both.model.vocab_size == 1024


def test_a_model_smaller_than_the_tokenizer_target_is_an_error_naming_both_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {vocab_size: 300}\ndata: {tokenizer: {vocab_size: 512}}\n")
    from Ava.config import load_config

    with pytest.raises(AvaConfigError) as err:
        load_config(path, check_environment=False)
    message = str(err.value)
    assert "model.vocab_size: 300" in message and "data.tokenizer.vocab_size=512" in message
    assert "\n" not in message
    path.write_text("model: {vocab_size: 100}\n")
    with pytest.raises(AvaConfigError, match="model.vocab_size: 100 .*at least 260"):
        load_config(path, check_environment=False)


def test_model_vocab_size_300_with_the_default_tokenizer_size_trains(tmp_path, corpus_cache):
    config = validate_config(_tiny_without_tokenizer_size(tmp_path, corpus_cache, vocab_size=300))
    data = prepare_data(config.data, config.run.seed)
    assert data.tokenizer.vocab_size <= 300
    trainer = EnhancedModularTrainer.from_config(config)
    trainer.prepare(data)  # checks that the model holds the tokenizer
    assert trainer.model.embed_tokens.num_embeddings == 300
    assert math.isfinite(_first_lm_loss(trainer))


def test_a_derived_vocab_is_the_real_tokenizer_size_rounded_up_to_64(tmp_path, corpus_cache):
    """The tiny corpus yields ~480 tokens of the 8,192 asked for: 512 embedding rows, first loss ≈ ln 512."""
    config = tiny_config(tmp_path, corpus_cache, "data.tokenizer.vocab_size=8192")
    assert config.model.vocab_size == 8192  # the estimate before the tokenizer exists
    data = prepare_data(config.data, config.run.seed)
    real = data.tokenizer.vocab_size
    assert real < 8192 - 64
    trainer = EnhancedModularTrainer.from_config(config)
    trainer.prepare(data)
    rows = round_vocab_size(real)
    assert trainer.model.embed_tokens.num_embeddings == rows == config.model.vocab_size
    assert trainer.model.lm_head.weight.shape[0] == rows
    loss = _first_lm_loss(trainer)
    assert abs(loss - math.log(rows)) < 0.25 < abs(loss - math.log(8192)), loss


def test_adopt_tokenizer_vocab_keeps_a_user_set_size_and_a_resumed_runs_size(tmp_path):
    derived = validate_config({})
    assert adopt_tokenizer_vocab(derived, 302) == \
        "model.vocab_size: 320 (the tokenizer's 302 tokens rounded up to a multiple of 64)"
    assert derived.model.vocab_size == 320
    user = validate_config({"model": {"vocab_size": 1000}})
    assert adopt_tokenizer_vocab(user, 302) is None and user.model.vocab_size == 1000
    assert resolve_vocab_size(user.model, 302) == 1000
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"model": {"vocab_size": 8192}}))  # a run saved with the target's size
    resumed = validate_config({})
    assert "8192, as the resumed run was saved with" in adopt_tokenizer_vocab(resumed, 302, saved)
    assert resumed.model.vocab_size == 8192


def test_resuming_does_not_refuse_a_derived_vocab_size_that_differs_from_the_estimate(tmp_path):
    run_config = validate_config({})
    adopt_tokenizer_vocab(run_config, 302)  # the run was saved with 320
    assert resume_changes(run_config.to_dict(), validate_config({}), tmp_path) == []
    with pytest.raises(AvaConfigError, match="model.vocab_size: 320 -> 384"):
        resume_changes(run_config.to_dict(), validate_config({"model": {"vocab_size": 384}}), tmp_path)
    # a run whose tokenizer was trained to another target: a resumed run reads its own tokenizer.json
    older = validate_config({"model": {"vocab_size": 1024}, "data": {"tokenizer": {"vocab_size": 8192}}})
    assert resume_changes(older.to_dict(), validate_config({"model": {"vocab_size": 1024}}), tmp_path) == []


def test_a_derived_vocab_run_saves_its_size_and_resumes_with_it(tmp_path, corpus_cache):
    steps = ["data.tokenizer.vocab_size=8192", "training.eval_every=2", "evaluation.sample_max_new_tokens=0"]
    config = tiny_config(tmp_path, corpus_cache, "training.max_steps=2", *steps)
    first = EnhancedModularTrainer.from_config(config).train()
    saved = yaml.safe_load((tmp_path / first.run_dir / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 512
    again = tiny_config(tmp_path, corpus_cache, "training.max_steps=3", *steps)
    trainer = EnhancedModularTrainer.from_config(again)
    assert trainer.train(resume=first.run_dir).steps == 3
    assert trainer.model.embed_tokens.num_embeddings == 512
