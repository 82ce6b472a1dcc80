import pytest

from Ava.errors import AvaOutputError
from Ava.utils.output_paths import check_output_dir, check_output_file



def test_missing_folder_is_fine_and_not_created(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "--out") == target
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []


def test_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AvaOutputError, match=r"run.output_dir .*is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "runs", "run.output_dir")


def test_unwritable_parent(unwritable_dir):
    with pytest.raises(AvaOutputError, match=rf"--out .*cannot write to {unwritable_dir}"):
        check_output_dir(unwritable_dir / "new", "--out")
    with pytest.raises(AvaOutputError, match=rf"--plot {unwritable_dir}/plot.png: cannot write"):
        check_output_file(unwritable_dir / "plot.png", "--plot")


def test_output_file_that_is_a_folder(tmp_path):
    with pytest.raises(AvaOutputError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--out")
    assert check_output_file(tmp_path / "x" / "y.json", "--out") == tmp_path / "x" / "y.json"
