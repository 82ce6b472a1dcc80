"""Evaluation: ECE and expert statistics on hand-computed cases, the eval report."""

import json
import math

import pytest
import torch

from Ava.cli.main import main
from Ava.evaluation import evaluate_tokens, expected_calibration_error, expert_utilisation
from Ava.models.routing_metrics import RoutingTotals


def test_ece_on_a_hand_computed_case():
    # 15 bins: 0.95 → bin 14 (acc 0.5, conf 0.95), 0.55 → bin 8 (acc 1), 0.25 → bin 3 (acc 0)
    conf = torch.tensor([0.95, 0.95, 0.55, 0.25], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 0])
    expected = 2 / 4 * 0.45 + 1 / 4 * 0.45 + 1 / 4 * 0.25
    assert math.isclose(expected_calibration_error(conf, correct), expected, abs_tol=1e-12)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1, 0])) == 0.0


def test_expert_utilisation_statistics():
    stats = expert_utilisation(torch.tensor([6, 2, 0, 0]), router_entropy=math.log(4) / 2)
    assert stats["load_shares"] == [0.75, 0.25, 0.0, 0.0]
    assert stats["max_vio"] == pytest.approx(2.0) and stats["dead_experts"] == [2, 3]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert stats["load_entropy"] == pytest.approx(h) and stats["router_entropy_normalised"] == pytest.approx(0.5)
    assert expert_utilisation(torch.tensor([3, 3, 3]))["max_vio"] == 0.0


def test_evaluate_tokens_loss_equals_the_model_loss(trained_run):
    trainer, _ = trained_run
    model, tok = trainer.model.eval(), trainer.data.tokenizer
    ids = tok.encode("ROMEO:\nThe king loves the stars. JULIET:\nThe moon remembers a poor soul.")[:40]
    ref = model(torch.tensor([ids]), labels=torch.tensor([ids])).lm_loss.item()
    routing = RoutingTotals()
    out = evaluate_tokens(model, ids, routing=routing)
    assert out["tokens"] == len(ids) - 1 and out["loss"] == pytest.approx(ref, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    counts = routing.counts[0]
    assert int(counts.sum()) == len(ids) * model.config.moe.top_k


def test_ava_eval_writes_json_and_markdown(trained_run, tmp_path, capsys):
    _, summary = trained_run
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "KING:\nThe king loves", "choices": ["the stars.", "qxz zjv wkkp."],
                              "answer": 0}) + "\n")
    text = tmp_path / "extra.txt"
    text.write_text("ROMEO:\nThe king loves the stars.\n\nJULIET:\nThe moon calls a poor soul.\n" * 5)
    assert main(["eval", str(summary.run_dir), "--data", str(text), "--mc", str(mc), "--out", str(tmp_path / "r"),
                 "--samples", "1", "--sample-tokens", "8"]) == 0
    report = json.loads((tmp_path / "r" / "eval_report.json").read_text())
    assert report["sources"]["extra.txt"]["tokens"] > 0 and report["multiple_choice"]["acc"] == 1.0
    assert 0 <= report["calibration"]["ece"] <= 1 and set(report["experts"]) == {"0", "1"}
    assert len(report["experts"]["0"]["load_shares"]) == 4 and len(report["samples"]) == 1
    md = (tmp_path / "r" / "eval_report.md").read_text()
    assert "## Expert utilisation" in md and "ECE" in md
    # without --data: the run's validation split, report next to the checkpoint
    assert main(["eval", str(summary.run_dir), "--samples", "0"]) == 0
    assert "validation: loss" in capsys.readouterr().out
