"""configs/reference.yaml lists every key with its default and stays in sync with the schema."""

from pathlib import Path

from Ava.config import EnhancedTrainingConfig, render_reference_yaml
from Ava.config.loading import read_config_file

REFERENCE = Path(__file__).resolve().parents[2] / "configs" / "reference.yaml"


def test_reference_yaml_is_in_sync_with_the_schema():
    assert REFERENCE.read_text(encoding="utf-8") == render_reference_yaml(), (
        "configs/reference.yaml is stale: run `ava config reference > configs/reference.yaml`"
    )


def test_reference_yaml_loads_as_the_default_config():
    # read as Ava reads configs: `1e-06` is a float (YAML 1.2), which strict validation needs
    data = read_config_file(REFERENCE)
    assert EnhancedTrainingConfig.model_validate(data) == EnhancedTrainingConfig()


def _leaf_keys(schema_cls, prefix=""):
    from pydantic import BaseModel

    for name, field in schema_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_key_has_a_description_and_appears_in_the_reference():
    text = REFERENCE.read_text(encoding="utf-8")
    for key, field in _leaf_keys(EnhancedTrainingConfig):
        assert field.description, f"{key} has no description"
        assert f"{key.rsplit('.', 1)[-1]}:" in text, f"{key} missing from reference.yaml"
