from Ava.utils.progress import progress_bar


def test_bar_shows_rate_and_eta_on_stderr(capsys):
    with progress_bar(4, "eval", "batch", show=True) as bar:
        for _ in range(4):
            bar.update(1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "eval" in captured.err and "4/4" in captured.err and "batch/s" in captured.err


def test_hidden_when_not_a_terminal(capsys):
    with progress_bar(4, "eval", "batch") as bar:  # pytest's stderr is not a terminal
        bar.update(4)
    assert capsys.readouterr().err == ""
