"""LoRA fine-tuning and bf16 weights with fp32 masters train on one process for now: on several
ranks (Gloo, 2 forked workers) every rank refuses in one line before the first step."""

from __future__ import annotations

from pathlib import Path

import pytest

from Ava.errors import AvaConfigError
from tests.conftest import tiny_config
from tests.distributed_harness import run_workers


def _refusal(rank: int, world_size: int, out: Path, cache: Path, overrides: tuple[str, ...]) -> str:
    from Ava.training import EnhancedModularTrainer

    try:
        EnhancedModularTrainer.from_config(tiny_config(out, cache, "distributed.strategy=ddp", *overrides)).train()
    except AvaConfigError as err:
        return str(err)
    return "trained"


@pytest.mark.parametrize("feature", ["finetune", "param_dtype"])
def test_one_process_features_are_refused_on_two_ranks(feature, trained_run, tmp_path, corpus_cache):
    overrides = ((f"finetune.base={trained_run[1].run_dir}",) if feature == "finetune"
                 else ("precision.dtype=bf16", "precision.param_dtype=bf16"))
    messages = run_workers(_refusal, 2, tmp_path, corpus_cache, overrides)
    want = "finetune" if feature == "finetune" else "precision.param_dtype: bf16"
    assert all(m.startswith(f"{want} trains on one process for now") for m in messages), messages
