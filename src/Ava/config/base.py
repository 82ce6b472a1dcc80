"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class AvaSection(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and values
    are never converted between booleans, numbers and text.

    Strict mode: ``max_steps: yes`` (a YAML boolean), ``learning_rate: "3e-4"`` (text) and
    ``name: 123`` (a number for a text key) are errors naming the key, not 1, 0.0003 and "123".
    An integer is still accepted where a float is expected, and words for a ``Literal`` key are
    text as before. A field that needs a container converted (a YAML list for a tuple) says so
    with ``Field(strict=False)``; its items stay strict.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
