"""``ava train`` on several processes (Gloo, forked workers) against the one-process reference.

The reference is the same config on one process with the same global batch: DDP, FSDP2 and
expert parallelism must give its per-step losses and final weights (fp32: relative 1e-5; the
ranks' micro-batches hold other rows than the reference's, so sums run in another order), a
sharded checkpoint must resume bit-exactly on as many ranks and within tolerance on one, and
its consolidated ``model.safetensors`` must export to Hugging Face with the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from Ava.errors import AvaCheckpointError, AvaConfigError
from tests.conftest import tiny_config
from tests.distributed_harness import run_workers

STEPS = 6
COMMON = (f"training.max_steps={STEPS}", "training.log_every=1", "training.eval_every=3", "training.batch_size=8",
          "training.global_batch_size=16", "scheduler.warmup_steps=2", "evaluation.sample_max_new_tokens=4",
          "run.device=cpu")
# Two ranks read half of each global micro-batch of 8 sequences (the reference's micro-batch).
HALF = ("training.batch_size=4",)
LOSS_RTOL = 1e-5  # per-step train loss, several ranks vs one process
WEIGHT_ATOL = 1e-5  # final weights after 6 AdamW steps at lr 3e-3


def _train(rank: int, world_size: int, out: Path, cache: Path, overrides: tuple[str, ...],
           resume: str | None = None) -> dict:
    from Ava.training import EnhancedModularTrainer

    summary = EnhancedModularTrainer.from_config(tiny_config(out, cache, *overrides)).train(resume=resume)
    return {"run_dir": summary.run_dir, "checkpoint": summary.checkpoint, "val": summary.final_val_loss,
            "tokens": summary.tokens}


def _losses(run_dir: str | Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def _weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def _assert_same_training(run: dict, reference: dict) -> None:
    ours, ref = _losses(run["run_dir"]), _losses(reference["run_dir"])
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=LOSS_RTOL), step
    assert run["tokens"] == reference["tokens"]
    got, want = _weights(run["checkpoint"]), _weights(reference["checkpoint"])
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_cache) -> dict:
    """The one-process run every distributed run is compared with."""
    (result,) = run_workers(_train, 1, tmp_path_factory.mktemp("one"), corpus_cache, COMMON)
    return result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_data_parallel_training_equals_one_process(strategy, reference, tmp_path, corpus_cache):
    runs = run_workers(_train, 2, tmp_path, corpus_cache, (*COMMON, *HALF, f"distributed.strategy={strategy}",
                                                          "distributed.health_every=2",
                                                          "training.save_every=3"))
    assert runs[0]["run_dir"] == runs[1]["run_dir"] and runs[0]["val"] == runs[1]["val"]
    _assert_same_training(runs[0], reference)
    root = Path(runs[0]["run_dir"])
    # rank 0 writes the shared files; every rank keeps its own log
    assert (root / "logs" / "train.log").is_file() and (root / "logs" / "train.rank1.log").is_file()
    assert (root / "summary.json").is_file() and (root / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    checked = {r["step"] for r in rows if any(k.startswith("health/") for k in r)}
    assert checked == {2, 4, 6}  # the ranks were compared every distributed.health_every steps
    final = Path(runs[0]["checkpoint"])
    assert (final / "sharded" / ".metadata").is_file() and (final / "model.safetensors").is_file()


def test_expert_parallel_training_equals_one_process(reference, tmp_path, corpus_cache):
    runs = run_workers(_train, 2, tmp_path, corpus_cache, (*COMMON, *HALF, "distributed.strategy=ddp",
                                                          "distributed.expert_parallel=2"))
    _assert_same_training(runs[0], reference)


@pytest.mark.slow
def test_data_times_expert_parallel_on_four_processes_equals_one_process(reference, tmp_path, corpus_cache):
    runs = run_workers(_train, 4, tmp_path, corpus_cache, (*COMMON, "training.batch_size=2",
                                                          "distributed.expert_parallel=2"))
    _assert_same_training(runs[0], reference)


def test_sharded_checkpoint_resumes_exactly_on_two_ranks_and_closely_on_one(tmp_path, corpus_cache):
    overrides = (*COMMON, *HALF, "distributed.strategy=fsdp2", "training.save_every=3", "checkpoint.keep_last=null")
    (full, _) = run_workers(_train, 2, tmp_path / "full", corpus_cache, overrides)
    full_losses = _losses(full["run_dir"])
    step_3 = Path(full["run_dir"]) / "checkpoints" / "step_3"
    assert (step_3 / "sharded" / ".metadata").is_file()

    def resumed_copy(name: str) -> Path:
        run = tmp_path / name / Path(full["run_dir"]).name
        shutil.copytree(full["run_dir"], run, symlinks=True)
        shutil.rmtree(run / "checkpoints" / f"step_{STEPS}")
        (run / "checkpoints" / "latest").unlink()
        (run / "checkpoints" / "latest").symlink_to("step_3")
        return run

    two = resumed_copy("two")
    (again, _) = run_workers(_train, 2, tmp_path / "two", corpus_cache, overrides, str(two))
    assert {s: _losses(again["run_dir"])[s] for s in range(4, STEPS + 1)} == \
           {s: full_losses[s] for s in range(4, STEPS + 1)}
    assert torch.equal(torch.cat([t.flatten() for t in _weights(again["checkpoint"]).values()]),
                       torch.cat([t.flatten() for t in _weights(full["checkpoint"]).values()]))

    one = resumed_copy("one")
    (single,) = run_workers(_train, 1, tmp_path / "one", corpus_cache,
                            tuple(o for o in overrides if o not in HALF and not o.startswith("distributed.")), str(one))
    for step in range(4, STEPS + 1):
        assert _losses(single["run_dir"])[step] == pytest.approx(full_losses[step], rel=LOSS_RTOL)


def test_consolidated_weights_export_to_hugging_face_with_the_same_logits(tmp_path, corpus_cache):
    transformers = pytest.importorskip("transformers")
    from Ava.interop.huggingface import export_hf
    from Ava.models import EnhancedMoEModel

    (run, _) = run_workers(_train, 2, tmp_path, corpus_cache, (*COMMON, *HALF, "distributed.strategy=fsdp2"))
    checkpoint = Path(run["checkpoint"])
    ours = EnhancedMoEModel.from_pretrained(checkpoint).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(checkpoint, tmp_path / "hf")).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def _resume_expecting_checkpoint_error(rank: int, world_size: int, out: Path, cache: Path,
                                       overrides: tuple[str, ...], run: str) -> str:
    try:
        _train(rank, world_size, out, cache, overrides, run)
    except AvaCheckpointError as err:
        return str(err)
    return "no error"


def test_resuming_on_fewer_ranks_without_a_global_batch_size_is_refused_naming_both(tmp_path, corpus_cache):
    # global_batch_size null: 4 sequences × 2 accumulation steps × the number of ranks
    overrides = tuple(o for o in COMMON if "global_batch_size" not in o) + ("training.grad_accum_steps=2", *HALF)
    (run, _) = run_workers(_train, 2, tmp_path, corpus_cache, (*overrides, "distributed.strategy=ddp"))
    (message,) = run_workers(_resume_expecting_checkpoint_error, 1, tmp_path, corpus_cache, overrides,
                             run["run_dir"])
    assert "global batch of 16 sequences (2 ranks), this run has 8 (1 data-parallel rank)" in message
    assert "resume with training.global_batch_size=16" in message


def test_global_batch_size_derives_gradient_accumulation(tmp_path, corpus_cache):
    from Ava.training.batch import GlobalBatch

    training = tiny_config(tmp_path, corpus_cache, "training.batch_size=4", "training.global_batch_size=16").training
    assert (GlobalBatch.resolve(training, 1).grad_accum, GlobalBatch.resolve(training, 2).grad_accum) == (4, 2)
    assert GlobalBatch.resolve(training, 4).size == 16
    with pytest.raises(AvaConfigError, match="use a multiple of 12"):
        GlobalBatch.resolve(training, 3)


def _expert_parallel_alone(rank: int, world_size: int, out: Path, cache: Path) -> str:
    from Ava.training.distributed_manager import build_parallelism

    try:
        build_parallelism(tiny_config(out, cache, "distributed.expert_parallel=3"))
    except AvaConfigError as err:
        return str(err)
    return "no error"


def test_expert_parallel_must_divide_the_experts_and_the_processes(tmp_path, corpus_cache):
    messages = run_workers(_expert_parallel_alone, 3, tmp_path, corpus_cache)
    assert all("must divide both the number of processes (3) and model.num_experts (4)" in m for m in messages)
