"""Config rules of data.packing: false and data.max_tokens_per_batch: one line each, with the fix."""

from __future__ import annotations

import pytest

from Ava.config import load_config
from Ava.errors import AvaConfigError
from tests.conftest import REPO

CASES = [
    (("data.max_tokens_per_batch=512",),
     r"data\.max_tokens_per_batch: packed rows all hold data\.seq_len tokens, so a token budget needs "
     r"data\.packing: false; set training\.batch_size instead, or packing: false"),
    (("data.packing=false", "data.streaming=true", "data.sources=[{path: a.jsonl}]", "training.max_steps=5"),
     r"data\.packing: false needs every row's length up front, which data\.streaming never has; set streaming: "
     r"false, or prepare the data \(`ava prepare`\) and use data\.prepared"),
    (("data.packing=false", "progressive.curriculum.by=rarity", "progressive.curriculum.steps=5"),
     r"progressive: sequence-length warmup, batch-size ramp and curriculum schedule packed windows; turn them off"),
    (("data.packing=false", "data.max_tokens_per_batch=512", "training.global_batch_size=16"),
     r"training\.global_batch_size: counts sequences, but data\.max_tokens_per_batch sizes micro-batches by "
     r"tokens; set training\.grad_accum_steps instead"),
    (("data.packing=false", "data.max_tokens_per_batch=32"),
     r"data\.max_tokens_per_batch: 32 is below data\.seq_len=64, so a row of full length fits no micro-batch; "
     r"use at least 64"),
    (("data.packing=false", "gradient.surgery.method=pcgrad", "gradient.surgery.terms=[lm_loss, load_balance]"),
     r"gradient\.surgery\.method: its per-term backward is not weighted per loss token"),
]


@pytest.mark.parametrize("overrides,message", CASES)
def test_unsupported_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(AvaConfigError, match=message) as err:
        load_config(REPO / "configs" / "tiny.yaml", list(overrides), check_environment=False)
    assert "\n" not in str(err.value)


def test_unpacked_rows_with_a_budget_load():
    config = load_config(REPO / "configs" / "tiny.yaml", ["data.packing=false", "data.max_tokens_per_batch=256"],
                         check_environment=False)
    assert config.data.packing is False and config.data.max_tokens_per_batch == 256
    assert load_config(REPO / "configs" / "tiny.yaml", check_environment=False).data.packing is True
