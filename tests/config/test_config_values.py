"""Config values are never converted between booleans, numbers and text; empty or non-mapping
config files are errors; list items are set by index from the command line."""

import re
from pathlib import Path

import pytest

from Ava.config import EnhancedTrainingConfig, apply_override, load_config
from Ava.errors import AvaConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, *overrides: str) -> str:
    with pytest.raises(AvaConfigError) as err:
        load_config(path, list(overrides), check_environment=False)
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# no silent coercion in files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("training: {max_steps: yes}", "training.max_steps: input should be a valid integer (got yes); YAML reads yes "
                                   "as a boolean"),
    ("training: {max_steps: on}", "training.max_steps: input should be a valid integer (got on)"),
    ("training: {batch_size: true}", "training.batch_size: input should be a valid integer (got true)"),
    ("training: {learning_rate: True}", "training.learning_rate: input should be a valid number (got True)"),
    ("training: {learning_rate: off}", "training.learning_rate: input should be a valid number (got off)"),
    ("training: {learning_rate: '3e-4'}", "training.learning_rate: input should be a valid number (got '3e-4'); "
                                          "write a number, without quotes"),
    ("training: {max_steps: '100'}", "training.max_steps: input should be a valid integer (got '100')"),
    ("training: {max_steps: 1e3}", "training.max_steps: input should be a valid integer (got 1e3); write a whole "
                                   "number: 1000"),
    ("run: {name: 123}", "run.name: input should be a valid string (got 123); quote it to make it text: '123'"),
    ("run: {name: 0123}", "run.name: input should be a valid string (got 0123)"),
    ("run: {name: yes}", "run.name: input should be a valid string (got yes)"),
    ("run: {name: 2024-01-01}", "run.name: input should be a valid string (got 2024-01-01)"),
    ("model: {tie_embeddings: 1}", "model.tie_embeddings: input should be a valid boolean (got 1); write true or "
                                   "false"),
    ("model: {tie_embeddings: 'yes'}", "model.tie_embeddings: input should be a valid boolean (got 'yes')"),
    ("optimizer: {betas: [yes, 0.99]}", "optimizer.betas.0: input should be a valid number (got yes)"),
    ("data: {sources: [{path: a.txt, weight: on}]}", "data.sources.0.weight: input should be a valid number "
                                                     "(got on)"),
    ("data: {dedup: no}", "data.dedup: input should be 'none', 'exact' or 'near' (got no); YAML reads no as a "
                          "boolean"),
])
def test_a_value_of_the_wrong_kind_is_an_error_naming_the_key_and_the_value_as_written(tmp_path, text, expected):
    message = load_error(write(tmp_path, text + "\n"))
    assert expected in message
    assert "command-line" not in message


def test_values_of_the_right_kind_still_load(tmp_path):
    cfg = load_config(write(tmp_path, """
training: {learning_rate: 1, max_steps: 1_000, grad_accum_steps: 2}
optimizer: {betas: [0.9, 0.99], eps: 1.0e-8, weight_decay: 0}
model: {rope_theta: 1e6, tie_embeddings: yes, loss: {fused_head: off}}
scheduler: {name: wsd}
run: {seed: 0123, name: "123", output_dir: 1:30}
data: {val_fraction: .1, dedup_threshold: 5E-1}
"""), check_environment=False)
    assert cfg.training.learning_rate == 1.0 and type(cfg.training.learning_rate) is float  # int → float is fine
    assert cfg.training.max_steps == 1000
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.optimizer.eps == 1e-8 and cfg.optimizer.weight_decay == 0.0
    assert cfg.model.rope_theta == 1e6  # YAML 1.2 floats: PyYAML alone reads `1e6` as text
    assert cfg.model.tie_embeddings is True and cfg.model.loss.fused_head == "off"
    assert cfg.scheduler.name == "wsd"
    assert cfg.run.seed == 123  # decimal, not YAML 1.1's octal 83
    assert cfg.run.name == "123" and cfg.run.output_dir == "1:30"  # not YAML 1.1's sexagesimal 90
    assert cfg.data.val_fraction == 0.1 and cfg.data.dedup_threshold == 0.5


def test_every_shipped_config_and_docs_example_still_validates():
    from Ava.config.loading import _parse_yaml

    for path in [*sorted((REPO / "configs").glob("*.yaml")), REPO / "config.yaml"]:
        load_config(path, check_environment=False)
    blocks = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"```ya?ml\n(.*?)```", text, re.S):
            line = text[: match.start()].count("\n") + 1
            data, _ = _parse_yaml(match.group(1))
            if not isinstance(data, dict) or not set(data) & set(EnhancedTrainingConfig.model_fields):
                continue  # another tool's YAML (e.g. an lm-evaluation-harness task)
            EnhancedTrainingConfig.from_dict(data, f"{doc.name}:{line}")
            blocks += 1
    assert blocks > 0


def test_a_programmatic_dict_is_strict_too():
    with pytest.raises(AvaConfigError, match=r"training\.max_steps: input should be a valid integer \(got True\)"):
        EnhancedTrainingConfig.from_dict({"training": {"max_steps": True}})
    cfg = EnhancedTrainingConfig.from_dict({"training": {"learning_rate": 2}, "optimizer": {"betas": [0.8, 0.9]}})
    assert cfg.training.learning_rate == 2.0 and cfg.optimizer.betas == (0.8, 0.9)
    with pytest.raises(ValueError):
        cfg.training.max_steps = True  # assignments are validated strictly as well


# --------------------------------------------------------------------------------------------
# command-line overrides: everything is text there
# --------------------------------------------------------------------------------------------


def test_overrides_keep_the_right_types():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["training.max_steps=10", "training.learning_rate=3e-4", "run.name=123",
                       "data.cache_dir=0123", "model.loss.fused_head=on", "data.prepared=null",
                       "optimizer.betas=[0.9, 0.95]", "model.tie_embeddings=yes"], check_environment=False)
    assert cfg.training.max_steps == 10 and type(cfg.training.max_steps) is int
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.run.name == "123"  # a text key takes a bare number as typed...
    assert cfg.data.cache_dir == "0123"  # ...exactly as typed
    assert cfg.model.loss.fused_head == "on"
    assert cfg.data.prepared is None
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.model.tie_embeddings is True


@pytest.mark.parametrize("override, expected", [
    ("training.max_steps=yes", "training.max_steps: input should be a valid integer (got yes)"),
    ("training.learning_rate=on", "training.learning_rate: input should be a valid number (got on)"),
    ("training.max_steps=ten", "training.max_steps: input should be a valid integer (got 'ten')"),
    ("model.tie_embeddings=1", "model.tie_embeddings: input should be a valid boolean (got 1)"),
    ("optimizer.betas=[on, 0.9]", "optimizer.betas.0: input should be a valid number (got on)"),
])
def test_a_wrong_kind_on_the_command_line_names_the_key_and_the_value_as_typed(override, expected):
    message = load_error(REPO / "configs" / "tiny.yaml", override)
    assert expected in message
    assert message.endswith("(from the command-line override)")


def test_an_override_replaces_the_value_shown_for_a_key(tmp_path):
    path = write(tmp_path, "training: {max_steps: 5}\n")
    assert "(got on)" in load_error(path, "training.max_steps=on")


# --------------------------------------------------------------------------------------------
# files that are not configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n", "null\n", "~\n", "---\n"])
def test_a_file_without_settings_is_an_error_naming_it(tmp_path, text):
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: the file holds no settings")
    assert "is it the right file?" in message


@pytest.mark.parametrize("text, got", [
    ("- a\n- b\n", "got a list of 2 items"),
    ("configs/tiny.yaml\n", "got the text 'configs/tiny.yaml'"),
    ("42\n", "got the number 42"),
    ("true\n", "got the boolean true"),
])
def test_a_top_level_that_is_not_a_mapping_is_an_error(tmp_path, text, got):
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: the top level must be a mapping of sections")
    assert got in message


# --------------------------------------------------------------------------------------------
# list items by index
# --------------------------------------------------------------------------------------------


def test_the_documented_list_index_override_works(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n", encoding="utf-8")
    # docs/training.md: `ava train configs/demo.yaml data.sources.0.path=corpus.txt` (demo.yaml has no sources)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.sources.0.path={corpus}"])
    assert [s.path for s in cfg.data.sources] == [str(corpus)]
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [f"data.sources.0.path={corpus}", "data.sources.0.weight=2",
                       f"data.sources.1.path={corpus}", "data.sources.1.format=txt"])
    assert [(s.path, s.weight, s.format) for s in cfg.data.sources] == [
        (str(corpus), 2.0, "auto"), (str(corpus), 1.0, "txt")]


def test_an_index_override_changes_one_item_of_a_list_from_the_file(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - {path: a.txt, weight: 3}\n    - {path: b.txt}\n")
    cfg = load_config(path, ["data.sources.1.path=c.txt", "data.sources.2.path=d.txt"], check_environment=False)
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("a.txt", 3.0), ("c.txt", 1.0), ("d.txt", 1.0)]


def test_an_index_into_a_default_list_keeps_its_other_items():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["gradient.surgery.terms.1=z_loss"], check_environment=False)
    assert cfg.gradient.surgery.terms == ["lm_loss", "z_loss"]


@pytest.mark.parametrize("override, expected", [
    ("data.sources.1.path=x.txt", "override 'data.sources.1.path=x.txt': data.sources holds no items, so the index "
                                  "must be 0 (to add one); got '1'"),
    ("data.sources.-1.path=x.txt", "data.sources holds no items, so the index must be 0 (to add one); got '-1'"),
    ("data.sources.first.path=x.txt", "data.sources is a list; pick an item by index, e.g. data.sources.0.path"),
    ("data.sources.path=x.txt", "data.sources is a list; pick an item by index, e.g. data.sources.0.path"),
    ("data.tokenizer.0=x", "data.tokenizer is a section, not a list"),
    ("model.0.hidden_size=64", "model is a section, not a list"),
    ("training.max_steps.0=1", "training.max_steps is a value, not a section"),
])
def test_a_bad_index_override_is_one_clear_line(override, expected):
    message = load_error(REPO / "configs" / "tiny.yaml", override)
    assert expected in message


def test_an_index_past_the_end_names_the_key_and_the_length(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{path: a.txt}, {path: b.txt}]\n")
    message = load_error(path, "data.sources.5.path=c.txt")
    assert message == ("override 'data.sources.5.path=c.txt': data.sources holds 2 items, so the index must be "
                       "0 to 1, or 2 to add one; got '5'")


def test_apply_override_without_a_schema():
    data = {"data": {"sources": [{"path": "a.txt"}]}}
    apply_override(data, "data.sources.0.path=b.txt")
    apply_override(data, "data.sources.1.path=c.txt")
    apply_override(data, "model.moe.top_k=2")
    assert data == {"data": {"sources": [{"path": "b.txt"}, {"path": "c.txt"}]}, "model": {"moe": {"top_k": 2}}}
    fresh: dict = {}
    apply_override(fresh, "data.sources.0.path=a.txt")
    assert fresh == {"data": {"sources": [{"path": "a.txt"}]}}
    with pytest.raises(AvaConfigError, match=r"data\.sources holds 2 items"):
        apply_override(data, "data.sources.3.path=d.txt")
    with pytest.raises(AvaConfigError, match=r"optimizer\.betas\.0 is a value, not a section"):
        apply_override({"optimizer": {"betas": [0.9, 0.95]}}, "optimizer.betas.0.x=1")


def test_a_saved_config_reads_back_the_same(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["run.name=1e3", "data.cache_dir=0123", "optimizer.eps=1e-9"],
                      check_environment=False)
    saved = tmp_path / "saved.yaml"
    cfg.to_yaml(saved)
    assert "name: '1e3'" in saved.read_text(encoding="utf-8")  # a YAML 1.2 reader would take 1e3 for a number
    again = load_config(saved, check_environment=False)
    assert again == cfg and again.run.name == "1e3" and again.data.cache_dir == "0123"
