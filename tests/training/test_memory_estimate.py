"""The memory estimate (``Ava.training.memory_estimate``): exact parameter, gradient and optimizer
bytes, activations close to what autograd keeps, and ``ava config check/show`` printing it."""

import contextlib
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from Ava.cli.main import main
from Ava.errors import AvaConfigError
from Ava.models import EnhancedMoEModel
from Ava.optimization import build_optimizer, optimizer_state_bytes
from Ava.training import memory_estimate
from Ava.training.memory_estimate import available_memory, check_fits, estimate_memory, format_bytes
from tests.conftest import REPO, tiny_config

VARIANTS = {
    "moe": (),
    "dense": ("model.moe.first_dense_layers=2",),
    "mixed": ("model.num_layers=3", "model.moe.moe_every=2"),
    "shared_experts": ("model.moe.num_shared_experts=2",),
    "mtp": ("model.mtp.num_heads=2",),
    "tied_uncertainty": ("model.tie_embeddings=true", "model.loss.uncertainty_weighting=[lm_loss,load_balance]"),
    "aux_free_noisy": ("model.moe.aux_free_bias=true", "model.moe.router=noisy_topk"),
}


def _config(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path / "runs", tmp_path / "cache", *overrides)


def _one_step(config):
    """A real model and optimizer after one forward, backward and optimizer step."""
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)
    model.train()
    optimizer = build_optimizer(model, config.optimizer, config.training.learning_rate, torch.device("cpu"))
    ids = torch.randint(0, config.model.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_is_the_models_without_allocating_it(tmp_path, variant):
    config = _config(tmp_path, *VARIANTS[variant])
    model = EnhancedMoEModel(config.model)
    rng = torch.get_rng_state()
    estimate = estimate_memory(config)
    assert torch.equal(torch.get_rng_state(), rng)  # building on the meta device draws nothing
    assert estimate.num_parameters == model.num_parameters()
    assert estimate.parameters == sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate.buffers == sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("optimizer, variant", [
    ("adamw", "mtp"), ("lion", "mtp"), ("sophia", "mtp"), ("muon", "mtp"), ("adafactor", "mtp"),
    ("adamw", "tied_uncertainty"), ("muon", "shared_experts"),
])
def test_gradients_and_optimizer_state_match_a_real_step_exactly(tmp_path, optimizer, variant):
    config = _config(tmp_path, *VARIANTS[variant], f"optimizer.name={optimizer}")
    model, opt = _one_step(config)
    estimate = estimate_memory(config, device="cpu")
    assert estimate.parameters == sum(p.nbytes for p in model.parameters())
    assert estimate.gradients == sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    assert estimate.optimizer_state == optimizer_state_bytes(opt)
    # a checkpoint stores the weights, the persistent buffers and the optimizer state
    persistent = sum(t.nbytes for name, t in model.named_buffers() if name in model.state_dict())
    assert estimate.checkpoint == estimate.parameters + persistent + estimate.optimizer_state


def _saved_tensor_bytes(config) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training forward."""
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)
    model.train()
    ids = torch.randint(0, config.model.vocab_size, (config.training.batch_size, config.data.seq_len))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    bf16 = config.precision.dtype == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("overrides", [
    (), ("precision.dtype=bf16",), ("model.moe.first_dense_layers=2",), ("model.mtp.num_heads=1",),
    ("model.moe.num_shared_experts=1", "precision.dtype=bf16"), ("model.loss.fused_head=off",),
    ("model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=4", "training.batch_size=4"),
])
def test_activation_estimate_is_close_to_what_autograd_keeps(tmp_path, overrides):
    config = _config(tmp_path, *overrides)
    estimate = estimate_memory(config)
    measured = _saved_tensor_bytes(config)
    assert 0.85 * measured <= estimate.activations + estimate.routing <= 1.2 * measured


def test_activations_scale_with_the_batch_and_checkpointing_cuts_them(tmp_path):
    by_batch = {b: estimate_memory(_config(tmp_path, f"training.batch_size={b}")) for b in (4, 8, 16)}
    act = {b: e.activations + e.routing for b, e in by_batch.items()}
    assert act[16] - act[8] == 2 * (act[8] - act[4]) > 0  # linear in the tokens of the micro-batch
    assert act[16] > 1.8 * act[8]
    for field in ("parameters", "gradients", "optimizer_state"):
        assert len({getattr(e, field) for e in by_batch.values()}) == 1  # the batch does not change them
    plain = estimate_memory(_config(tmp_path, "model.num_layers=6"))
    checkpointed = estimate_memory(_config(tmp_path, "model.num_layers=6", "performance.activation_checkpointing=true"))
    assert checkpointed.activations < 0.5 * plain.activations
    assert checkpointed.total < plain.total and checkpointed.parameters == plain.parameters
    bf16 = estimate_memory(_config(tmp_path, "precision.dtype=bf16"))
    assert bf16.activations < by_batch[8].activations and bf16.parameters == by_batch[8].parameters


def test_distributed_strategies_divide_what_they_shard(tmp_path):
    one = estimate_memory(_config(tmp_path), device="cpu")
    fsdp = estimate_memory(_config(tmp_path, "distributed.strategy=fsdp2"), ranks=4, device="cpu")
    assert fsdp.parameters == math.ceil(one.parameters / 4)
    assert fsdp.optimizer_state == math.ceil(one.optimizer_state / 4)
    assert fsdp.activations == one.activations
    ddp = estimate_memory(_config(tmp_path, "distributed.strategy=ddp"), ranks=4, device="cpu")
    assert ddp.parameters == one.parameters and ddp.gradients == 2 * one.gradients  # + DDP's buckets
    ep = estimate_memory(_config(tmp_path, "distributed.strategy=ddp", "distributed.expert_parallel=2"),
                         ranks=2, device="cpu")
    assert ep.parameters < one.parameters


def test_describe_names_every_term_in_readable_units(tmp_path):
    estimate = estimate_memory(_config(tmp_path))
    text = "\n".join(estimate.describe())
    for word in ("parameters", "gradients", "optimizer state", "activations", "total", "checkpoint on disk",
                 "adamw", "micro-batch 8 × 64"):
        assert word in text
    assert format_bytes(3 * 1024**3) == "3 GiB" and format_bytes(1536 * 1024) == "1.5 MiB"
    assert estimate.biggest_term()[1] == max(estimate.parameters, estimate.gradients, estimate.optimizer_state,
                                             estimate.activations, estimate.routing, estimate.buffers,
                                             estimate.other)


def test_check_fits_refuses_in_one_line_with_the_estimate(tmp_path, monkeypatch):
    config = _config(tmp_path)
    assert check_fits(config, "cpu").total == estimate_memory(config, device="cpu").total
    monkeypatch.setattr(memory_estimate, "available_memory", lambda device: 1024**2)
    with pytest.raises(AvaConfigError) as err:
        check_fits(config, "cpu")
    message = str(err.value)
    assert "\n" not in message and "needs about" in message and "biggest term: activations" in message
    assert "1 MiB available" in message and "training.batch_size" in message
    assert "performance.activation_checkpointing" in message
    # what the process already holds (a model built before the check) is not counted twice
    assert check_fits(config, "cpu", held=estimate_memory(config).total)
    monkeypatch.setenv("AVA_NO_MEMORY_CHECK", "1")
    assert check_fits(config, "cpu").total > 1024**2


def test_available_memory_on_cpu_is_positive_and_at_most_the_ram():
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory("cpu") <= ram


def test_config_check_refuses_a_model_too_big_for_the_machine(tmp_path, capsys):
    code = main(["config", "check", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path}",
                 "model.hidden_size=200000"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "memory estimate" in out and "optimizer state" in out and "OK" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this run needs about ")
    assert "biggest term: optimizer state" in lines[0] and "available" in lines[0]
    assert "Traceback" not in err
    # no allocation: the weights alone are far more than this machine has
    assert estimate_memory(_config(tmp_path, "model.hidden_size=200000")).parameters > available_memory("cpu")


def test_config_check_prints_the_estimate_of_a_run_that_fits(capsys):
    assert main(["config", "check", str(REPO / "configs" / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "memory estimate per process" in out and "total" in out and "tiny.yaml: OK" in out


def test_config_show_appends_the_estimate_as_yaml_comments(capsys):
    assert main(["config", "show", str(REPO / "configs" / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["model"]["hidden_size"] == 64 and shown["memory"]["enabled"] is False  # the section, not the estimate
    tail = out[out.index("# memory estimate"):].splitlines()
    assert all(line.startswith("#") for line in tail) and any("optimizer state" in line for line in tail)


def test_auto_strategy_is_the_trainers_rule():
    """The estimate sizes ``strategy: auto`` with the distributed trainer's own rule."""
    from Ava.training.distributed_manager import TRAINING_BYTES_PER_PARAMETER, auto_strategy

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = torch.device("cpu")
    assert auto_strategy(1000, cpu, 2) == "ddp"
    assert auto_strategy(ram // TRAINING_BYTES_PER_PARAMETER, cpu, 2) == "fsdp2"  # half the RAM per rank
