"""``ava eval``: inputs checked before the scoring, only what was asked scored, the report where
``--help`` says, document counts under ``--max-tokens``, long MC items, the MC metrics' names,
progress bars."""

import json
from pathlib import Path

import numpy as np
import pytest

import Ava.evaluation.comprehensive_eval as comprehensive_eval
from Ava.cli.main import main
from Ava.data.packing import PackedDataset, TokenStream
from Ava.evaluation import run_evaluation
from Ava.models import EnhancedMoEModel

QUESTION = {"question": "KING:\nThe king loves", "choices": ["the stars.", "qxz zjv wkkp."], "answer": 0}


def _mc(tmp_path: Path, *rows: dict | str) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the checkpoint's weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(EnhancedMoEModel, "from_pretrained", refuse)


def test_mc_alone_scores_only_the_questions(trained_run, tmp_path, monkeypatch, capsys):
    _, summary = trained_run

    def no_validation(*args, **kwargs):
        raise AssertionError("--mc alone must not score the validation split")

    monkeypatch.setattr(comprehensive_eval, "prepare_data", no_validation)
    out = tmp_path / "report"
    argv = ["eval", str(summary.run_dir), "--mc", str(_mc(tmp_path, QUESTION)), "--out", str(out),
            "--samples", "1", "--sample-tokens", "4"]
    assert main(argv) == 0
    report = json.loads((out / "eval_report.json").read_text())
    assert report["sources"] == {} and "calibration" not in report and "experts" not in report
    assert report["samples"][0]["prompt"] == QUESTION["question"]
    printed = capsys.readouterr().out
    assert "multiple choice (1 question): acc 1.0000  acc_norm 1.0000  acc_per_token 1.0000" in printed
    assert "validation" not in printed and "ECE" not in printed
    md = (out / "eval_report.md").read_text()
    assert "| `acc` |" in md and "| `acc_norm` |" in md and "| `acc_per_token` |" in md
    assert "Loss and perplexity" not in md


def test_report_names_the_three_metrics_with_their_definitions(trained_run, tmp_path):
    _, summary = trained_run
    report = run_evaluation(summary.run_dir, mc_file=_mc(tmp_path, QUESTION, QUESTION), out=tmp_path / "r",
                            num_samples=0)
    mc = report.results["multiple_choice"]
    assert {"acc", "acc_norm", "acc_per_token", "acc_stderr", "acc_norm_stderr", "acc_per_token_stderr"} <= set(mc)
    assert "accuracy" not in mc
    item = mc["items"][0]
    assert item["chars"] == [len(c) for c in QUESTION["choices"]]
    assert set(item["predicted"]) == {"acc", "acc_norm", "acc_per_token"}


@pytest.mark.parametrize(("row", "problem"), [
    ('{"question": "q", "choices": ["a", "b"], "answer": 7}', "not an index of the 2 choices"),
    ('{"question": "q", "choices": ["a", "b"]', "not JSON"),
    ('{"question": "q", "choices": "ab", "answer": 0}', '"choices" must be a list of strings'),
])
def test_a_bad_mc_row_fails_before_any_scoring(trained_run, tmp_path, capsys, no_model_load, row, problem):
    _, summary = trained_run
    mc = _mc(tmp_path, QUESTION, row)
    text = tmp_path / "extra.txt"
    text.write_text("ROMEO:\nThe king loves the stars.\n")
    assert main(["eval", str(summary.run_dir), "--data", str(text), "--mc", str(mc), "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert f"{mc}:2: bad multiple-choice row" in line and problem in line
    assert not (tmp_path / "r").exists()


def test_a_missing_mc_or_data_file_fails_before_the_model_loads(trained_run, tmp_path, capsys, no_model_load):
    _, summary = trained_run
    assert main(["eval", str(summary.run_dir), "--mc", str(tmp_path / "nope.jsonl")]) == 2
    assert "--mc" in _one_error_line(capsys)
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    assert main(["eval", str(summary.run_dir), "--data", str(good), str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in _one_error_line(capsys)


def test_an_unwritable_out_fails_before_the_model_loads(trained_run, unwritable_dir, capsys, no_model_load):
    _, summary = trained_run
    assert main(["eval", str(summary.run_dir), "--out", str(unwritable_dir / "report")]) == 2
    assert "--out" in _one_error_line(capsys)


def test_the_report_goes_where_help_says(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: CHECKPOINT/eval" in help_text
    _, summary = trained_run
    checkpoint = (Path(summary.run_dir) / "checkpoints" / "latest").resolve()
    assert main(["eval", str(summary.run_dir), "--mc", str(_mc(tmp_path, QUESTION)), "--samples", "0"]) == 0
    assert (checkpoint / "eval" / "eval_report.json").is_file()
    assert f"report: {checkpoint / 'eval' / 'eval_report.json'}" in capsys.readouterr().out


def test_document_counts_are_those_scored_under_max_tokens(trained_run, tmp_path, capsys):
    trainer, summary = trained_run
    tok = trainer.data.tokenizer
    docs = [f"ROMEO:\nThe king loves the stars, number {i}." for i in range(20)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    max_tokens = 40
    starts = np.cumsum([0] + [len(tok.encode(d)) + 1 for d in docs])[:-1]
    expected = int((starts < max_tokens + 1).sum())
    assert 1 < expected < len(docs)
    out = tmp_path / "r"
    assert main(["eval", str(summary.run_dir), "--data", str(data), "--max-tokens", str(max_tokens),
                 "--samples", "0", "--out", str(out)]) == 0
    source = json.loads((out / "eval_report.json").read_text())["sources"]["docs.jsonl"]
    assert (source["documents"], source["documents_total"]) == (expected, len(docs))
    assert f"{expected} of 20 documents" in capsys.readouterr().out
    assert f"| docs.jsonl | {expected} of 20 |" in (out / "eval_report.md").read_text()
    # without a cut: every document
    assert main(["eval", str(summary.run_dir), "--data", str(data), "--samples", "0", "--out", str(out)]) == 0
    source = json.loads((out / "eval_report.json").read_text())["sources"]["docs.jsonl"]
    assert source["documents"] == source["documents_total"] == 20


def test_validation_documents_are_counted_over_the_scored_windows():
    tokens = np.arange(100, dtype=np.uint32)
    dataset = PackedDataset(TokenStream(tokens, np.array([0, 10, 30, 70])), seq_len=16)
    assert comprehensive_eval._documents_in_windows(dataset, 1) == 2   # tokens 0–15: documents 0, 1
    assert comprehensive_eval._documents_in_windows(dataset, 2) == 3   # tokens 0–31: and 2
    assert comprehensive_eval._documents_in_windows(dataset, 6) == 4


def test_a_choice_longer_than_the_window_is_scored_with_a_warning(trained_run, tmp_path, capsys):
    _, summary = trained_run
    long_choice = "the stars and the moon and the sea " * 20  # far more than max_seq_len 64 tokens
    mc = _mc(tmp_path, {"question": "KING:\nThe king loves", "choices": ["the stars.", long_choice], "answer": 0})
    out = tmp_path / "r"
    assert main(["eval", str(summary.run_dir), "--mc", str(mc), "--samples", "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 choice did not fit the model's window (max_seq_len 64)" in captured.err
    report = json.loads((out / "eval_report.json").read_text())["multiple_choice"]
    assert report["truncated_choices"] == 1 and report["items"][0]["truncated"] == [False, True]
    assert "cut from the left" in (out / "eval_report.md").read_text()


def test_files_of_the_same_name_are_two_sources(trained_run, tmp_path):
    _, summary = trained_run
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "val.txt").write_text(f"ROMEO:\nThe king loves the stars in {folder}.\n")
    files = [str(tmp_path / "a" / "val.txt"), str(tmp_path / "b" / "val.txt")]
    report = run_evaluation(summary.run_dir, data=files, out=tmp_path / "r", num_samples=0)
    assert list(report.results["sources"]) == files


def test_each_pass_shows_a_progress_bar(trained_run, tmp_path, capsys):
    _, summary = trained_run
    text = tmp_path / "extra.txt"
    text.write_text("ROMEO:\nThe king loves the stars.\n" * 30)
    run_evaluation(summary.run_dir, data=[str(text)], mc_file=_mc(tmp_path, QUESTION), out=tmp_path / "r",
                   num_samples=1, sample_max_new_tokens=2, sample_fn=lambda m, t, p, n: " x", show_progress=True)
    err = capsys.readouterr().err
    for desc, unit in (("eval extra.txt", "window"), ("multiple choice", "question"), ("samples", "sample")):
        assert desc in err and f"{unit}/s" in err
    run_evaluation(summary.run_dir, data=[str(text)], out=tmp_path / "r", num_samples=0, show_progress=False)
    assert capsys.readouterr().err == ""
