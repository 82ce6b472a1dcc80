"""The CPU allocator tuning is applied on Linux/glibc and wired to performance.cpu_allocator."""

import platform
import sys

import pytest

from Ava.utils import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_tuning_applies_on_glibc():
    assert allocator.tune_cpu_allocator() is True


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.tune_cpu_allocator() is False


@pytest.mark.parametrize("setting, calls", [("tuned", 1), ("default", 0)])
def test_trainer_applies_the_config(tmp_path, corpus_cache, monkeypatch, setting, calls):
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer, enhanced_trainer
    from tests.conftest import tiny_config

    seen = []
    monkeypatch.setattr(enhanced_trainer, "tune_cpu_allocator", lambda: seen.append(1) or True)
    config = tiny_config(tmp_path, corpus_cache, "training.max_steps=1", "logging.tensorboard=false",
                         "evaluation.sample_max_new_tokens=0", f"performance.cpu_allocator={setting}")
    EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
    assert len(seen) == calls
