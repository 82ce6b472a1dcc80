"""One validation loss: the trainer's evaluate() and `ava eval` give the same numbers."""

import json
import math
import subprocess
import sys

import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.evaluation import CalibrationBins, TokenWindows, validation_loss
from Ava.models import EnhancedMoEModel


def _tiny_model() -> EnhancedMoEModel:
    torch.manual_seed(0)
    return EnhancedMoEModel(ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_experts=4,
                                        max_seq_len=16, moe={"top_k": 2, "moe_intermediate_size": 32}))


def test_validation_loss_is_the_trainers_evaluate_digit_for_digit(trained_run):
    trainer, _ = trained_run
    cfg = trainer.config
    expected = trainer.evaluate()
    got = validation_loss(trainer.model, trainer.data.val, batch_size=cfg.training.batch_size,
                          max_batches=cfg.training.eval_batches, device=trainer.device,
                          document_mask=cfg.data.document_mask)
    assert got == expected
    assert {"loss", "ppl", "expert_load", "expert_load_layers", "max_vio", "dead_experts"} <= set(got)


def test_loss_is_weighted_by_labelled_positions_and_short_windows_are_padded():
    model = _tiny_model().eval()
    ids = torch.randint(0, 40, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    windows = TokenWindows(ids, 16)  # 16 + 16 + 5 tokens
    assert [len(windows[i]) for i in range(len(windows))] == [16, 16, 5]
    with torch.no_grad():
        parts = [(model(w[None], labels=w[None]).lm_loss.item(), len(w) - 1) for w in (windows[i] for i in range(3))]
    expected = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    bins = CalibrationBins()
    result = validation_loss(model, windows, batch_size=2, calibration=bins)
    assert result["loss"] == pytest.approx(expected, rel=1e-5) and result["tokens"] == 15 + 15 + 4
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert bins.count.sum() == result["tokens"] and 0.0 <= result["accuracy"] <= 1.0
    assert result["nll"] == pytest.approx(expected, rel=1e-5)  # no smoothing: the objective is the CE
    first = validation_loss(model, windows, batch_size=2, max_batches=1)
    assert first["loss"] == pytest.approx(sum(loss * n for loss, n in parts[:2]) / 30, rel=1e-5)
    assert not {"tokens", "accuracy", "nll"} & set(first)  # the trainer's keys only


def test_validation_loss_restores_the_training_mode():
    model = _tiny_model().train()
    validation_loss(model, torch.randint(0, 40, (4, 16)), batch_size=2)
    assert model.training


def test_ava_eval_scores_the_validation_split_as_the_trainer_does(trained_run, tmp_path):
    trainer, summary = trained_run
    cfg = trainer.config
    budget = cfg.training.eval_batches * cfg.training.batch_size * cfg.data.seq_len  # the trainer's batches
    assert main(["eval", str(summary.run_dir), "--samples", "0", "--max-tokens", str(budget),
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_report.json").read_text())
    expected = trainer.evaluate()
    validation = report["sources"]["validation"]
    assert validation["objective"] == expected["loss"]  # the same function on the same windows
    assert validation["loss"] == pytest.approx(expected["loss"], rel=1e-5)  # plain CE = the objective here
    assert [report["experts"][str(layer)]["load_shares"] for layer in expected["expert_load_layers"]] \
        == expected["expert_load"]


def test_evaluation_does_not_import_generation():
    code = ("import sys, Ava.evaluation; "
            "sys.exit(any(m == 'Ava.generation' or m.startswith('Ava.generation.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_label_smoothing_changes_the_objective_not_the_reported_cross_entropy():
    torch.manual_seed(0)
    model = EnhancedMoEModel(ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_experts=4,
                                         max_seq_len=16, moe={"top_k": 2, "moe_intermediate_size": 32},
                                         loss={"label_smoothing": 0.2})).eval()
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(5))
    result = validation_loss(model, ids, batch_size=2, calibration=CalibrationBins())
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1)).item()
    assert result["nll"] == pytest.approx(plain, rel=1e-5) and abs(result["loss"] - result["nll"]) > 1e-3
