"""performance.compile: compiled decoder layers train like eager; evaluation and decoding stay eager.

The compiling tests are marked slow: the first compilation of the tiny layers takes 10-20 s on a
2-core CPU (less when inductor's on-disk cache is warm).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.errors import AvaConfigError
from Ava.models import EnhancedMoEModel
from Ava.config.compile_check import compile_problem
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's per-function cache would otherwise carry entries
    (and its recompile limit) from one test's model sizes to the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _frames() -> int:
    return counters["frames"]["total"]


def _model() -> EnhancedMoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 32, "first_dense_layers": 1},
                      mtp={"num_heads": 1})
    return EnhancedMoEModel(cfg)


def _loss_and_grads(model: EnhancedMoEModel, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_layers_match_eager_and_inference_stays_eager():
    model = _model()  # a dense layer, an MoE layer and an MoE MTP block
    ids = torch.randint(0, 53, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = _loss_and_grads(model, ids)

    model.compile_layers()
    frames = _frames()
    for checkpointing in (False, True):  # compiled layers also run under activation checkpointing
        model.set_activation_checkpointing(checkpointing)
        loss, grads = _loss_and_grads(model, ids)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        assert set(grads) == set(eager_grads)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert _frames() > frames, "the training forward did not go through torch.compile"

    frames = _frames()
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
        cached = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=cached.past_key_values, use_cache=True)
        with model.decoding():
            model(ids[:, -1:], past_key_values=cached.past_key_values, use_cache=True)
    assert _frames() == frames, "evaluation or decoding went through torch.compile"
    torch.testing.assert_close(step.logits[:, -1], logits[:, -1], rtol=1e-4, atol=1e-5)

    model.compile_layers(False)
    frames = _frames()
    _loss_and_grads(model, ids)
    assert _frames() == frames


@pytest.mark.slow
def test_performance_compile_trains_evaluates_and_samples(tmp_path, corpus_cache):
    overrides = ["training.max_steps=2", "training.eval_every=1", "training.eval_batches=1",
                 "training.log_every=1", "evaluation.sample_max_new_tokens=4"]

    def run(name: str, *extra: str):
        config = tiny_config(tmp_path / name, corpus_cache, *overrides, *extra)
        seed_everything(config.run.seed)
        trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
        return trainer, trainer.train()

    _, eager = run("eager")
    trainer, compiled = run("compiled", "performance.compile=true")
    log = (Path(compiled.run_dir) / "logs" / "train.log").read_text()
    assert "performance.compile: torch.compile of the decoder layers" in log and "first training step is slow" in log
    assert compiled.steps == 2 and isinstance(compiled.sample, str)
    assert math.isfinite(compiled.final_val_loss)

    def train_losses(summary) -> list[float]:
        lines = (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]

    assert train_losses(compiled)[0] == pytest.approx(train_losses(eager)[0], rel=1e-5)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-3)

    frames = _frames()
    trainer.evaluate()
    trainer._sample()
    assert _frames() == frames, "evaluation or sampling recompiled"


def test_no_cpp_compiler_is_a_one_line_config_error_before_the_run(tmp_path, corpus_cache, capsys):
    from torch._inductor import config as inductor_config

    config = tiny_config(tmp_path / "runs", corpus_cache, "performance.compile=true")  # loads: g++ is there
    with inductor_config.patch({"cpp.cxx": ("ava-no-such-compiler",)}):
        problem = compile_problem(torch.device("cpu"))
        assert problem is not None and "C++ compiler" in problem

        with pytest.raises(AvaConfigError, match=r"performance\.compile: torch\.compile cannot run on cpu here"):
            EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
        assert not (tmp_path / "runs").exists(), "the run folder was created before the check"

        code = main(["train", "configs/tiny.yaml", "performance.compile=true", f"run.output_dir={tmp_path / 'cli'}",
                     f"data.cache_dir={corpus_cache}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "performance.compile" in err and "Traceback" not in err

        code = main(["config", "check", "configs/tiny.yaml", "performance.compile=true"])
        err = capsys.readouterr().err
        assert code == 2 and "performance.compile: torch.compile cannot run on cpu here" in err
    assert compile_problem(torch.device("cpu")) is None


def test_runs_saved_before_these_keys_resume_and_may_switch_them(tmp_path, corpus_cache):
    """A run whose config.yaml predates performance.compile / activation_checkpointing resumes;
    switching either on at resume is an allowed (logged) change."""
    import yaml

    from Ava.training.run_manager import check_resume_config

    config = tiny_config(tmp_path / "runs", corpus_cache)
    saved = config.to_dict()
    del saved["performance"]["compile"], saved["performance"]["activation_checkpointing"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume_config(tmp_path, config) == []
    switched = tiny_config(tmp_path / "runs", corpus_cache, "performance.compile=true",
                           "performance.activation_checkpointing=true")
    assert check_resume_config(tmp_path, switched) == [
        "performance.activation_checkpointing: False -> True", "performance.compile: False -> True"]


def test_a_compiled_model_pickles_and_copies_with_compile_still_on():
    """torch.save of the whole model and deepcopy work after compile_layers(); the copy is compiled
    too and runs its own weights (compilation itself is not triggered here: eval forwards only)."""
    import copy
    import io

    model = EnhancedMoEModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_experts=4,
                                         max_seq_len=16, moe={"top_k": 2, "moe_intermediate_size": 32}))
    model.compile_layers()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    for other in (loaded, twin):
        assert all(layer._compiled_block is not None for layer in other.layers)
        with torch.no_grad():
            other.layers[0].input_layernorm.weight.mul_(2.0)  # its own weights, not the original's
    ids = torch.randint(0, 64, (1, 8))
    model.eval(), loaded.eval(), twin.eval()
    with torch.no_grad():
        base = model(ids).logits
        assert not torch.equal(loaded(ids).logits, base) and torch.equal(loaded(ids).logits, twin(ids).logits)
