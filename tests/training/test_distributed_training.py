"""``ava train`` on several processes (Gloo, forked workers) against the one-process reference.

The reference is the same config on one process with the same global batch and global
micro-batch: DDP, FSDP2 and expert parallelism must give its per-step losses (fp32, relative 1e-6)
and final weights (absolute 5e-6); the ranks sum their halves of each micro-batch in another order
than one process does, so the results agree to rounding, not bit for bit. A
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
LOSS_RTOL = 1e-6  # per-step train loss, several ranks vs one process (measured: 1.5e-7)
WEIGHT_ATOL = 5e-6  # final weights after 6 AdamW steps at lr 3e-3 (measured: 1.5e-6)


def _train(rank: int, world_size: int, out: Path, cache: Path, overrides: tuple[str, ...],
           resume: str | None = None) -> dict:
    from Ava.training import EnhancedModularTrainer

    summary = EnhancedModularTrainer.from_config(tiny_config(out, cache, *overrides)).train(resume=resume)
    return {"run_dir": summary.run_dir, "checkpoint": summary.checkpoint, "val": summary.final_val_loss,
            "tokens": summary.tokens}


def _losses(run_dir: str | Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in _train_rows(run_dir).items()}


def _train_rows(run_dir: str | Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("split") == "train"}


def _weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def _assert_same_training(run: dict, reference: dict) -> None:
    ours, ref = _losses(run["run_dir"]), _losses(reference["run_dir"])
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=LOSS_RTOL), step
    assert run["tokens"] == reference["tokens"]
    cursors = [torch.load(Path(r["checkpoint"]) / "state.pt", weights_only=True)["data_cursor"] for r in (run, reference)]
    assert cursors[0]["source_tokens"] == cursors[1]["source_tokens"] != {}  # every rank's rows counted
    # routing statistics are the global batch's (loads and router sums all-reduced over the ranks)
    rows, ref_rows = _train_rows(run["run_dir"]), _train_rows(reference["run_dir"])
    for key in ("max_vio", "load_entropy", "router_entropy", "token_drop_rate"):
        assert rows[1][key] == pytest.approx(ref_rows[1][key], rel=1e-5, abs=1e-7), key
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


@pytest.mark.parametrize("layout", ["distributed.strategy=fsdp2", "distributed.expert_parallel=2"])
def test_sharded_checkpoint_resumes_exactly_on_two_ranks_and_closely_on_one(layout, tmp_path, corpus_cache):
    overrides = (*COMMON, *HALF, layout, "training.save_every=3", "checkpoint.keep_last=null")
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


def _train_returning_router_biases(rank: int, world_size: int, out: Path, cache: Path,
                                   overrides: tuple[str, ...]) -> list[torch.Tensor]:
    from Ava.training import EnhancedModularTrainer

    trainer = EnhancedModularTrainer.from_config(tiny_config(out, cache, *overrides))
    trainer.train()
    return [b.clone() for name, b in trainer.model.named_buffers() if name.endswith("expert_bias")]


@pytest.mark.parametrize("parallel", [("distributed.strategy=ddp",), ("distributed.expert_parallel=2",)])
def test_every_replica_holds_the_identical_router_bias(parallel, tmp_path, corpus_cache):
    overrides = (*COMMON, *HALF, *parallel, "model.moe.aux_free_bias=true", "model.moe.bias_update_rate=0.01",
                 "distributed.health_every=1")
    rank0, rank1 = run_workers(_train_returning_router_biases, 2, tmp_path, corpus_cache, overrides)
    assert len(rank0) == 2 and all(b.abs().sum() > 0 for b in rank0)  # updated away from zero
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # bit for bit


def _signal_on_rank_1(rank: int, world_size: int, out: Path, cache: Path) -> dict:
    from Ava.training import EnhancedModularTrainer

    trainer = EnhancedModularTrainer.from_config(tiny_config(out, cache, *COMMON, *HALF, "distributed.strategy=ddp"))

    def on_step(step: int) -> None:  # as SIGTERM's handler does, on rank 1 only, after step 2's collectives
        if rank == 1 and step == 2:
            trainer._stop_signal = "SIGTERM"

    try:
        trainer.train(on_step=on_step)
    except KeyboardInterrupt as stop:
        return {"stopped": str(stop), "step": trainer.step, "checkpoints": sorted(
            p.name for p in trainer.paths.checkpoints.glob("step_*"))}
    return {"stopped": None, "step": trainer.step}


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, corpus_cache):
    results = run_workers(_signal_on_rank_1, 2, tmp_path, corpus_cache)
    # rank 1 learns of it after step 2; the flag rides step 3's all-reduce, so both finish step 3 and save it
    assert results[0] == results[1] == {"stopped": "SIGTERM", "step": 3, "checkpoints": ["step_3"]}


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


# --------------------------------------------------------------------------------------------
# `ava train --nproc 2` end to end: a dead or hung rank ends the whole job, naming the rank
# --------------------------------------------------------------------------------------------


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the ``torchrun`` worker with ``RANK=rank`` below ``launcher_pid`` (from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f"RANK={rank}".encode() not in environ:
            continue
        parent = int(stat[1])
        while parent > 1:  # is it a descendant of our launcher?
            if parent == launcher_pid:
                return int(proc.name)
            try:
                parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
    return None


def _gone(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' pids through /proc")
def test_a_killed_or_hung_rank_ends_ava_train_naming_the_rank(tmp_path, corpus_cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    timeout_s = 5
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    jobs = {}
    for how in ("kill", "stop"):
        out = tmp_path / how
        args = [sys.executable, "-m", "Ava", "train", "configs/tiny.yaml", "--nproc", "2", "training.max_steps=100000",
                "training.num_epochs=1000", "training.log_every=1", "training.eval_every=100000",
                f"run.output_dir={out}", f"data.cache_dir={corpus_cache}", f"distributed.timeout_s={timeout_s}",
                "distributed.strategy=ddp"]
        jobs[how] = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    victims = {}
    try:
        for how, job in jobs.items():  # wait until training runs and rank 1's process is found
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and victims.get(how) is None:
                assert job.poll() is None, job.communicate()[0]
                if list((tmp_path / how).glob("*/metrics.jsonl")):
                    victims[how] = _rank_pid(job.pid, 1)
                time.sleep(0.2)
            assert victims.get(how) is not None, f"{how}: rank 1 not found"
        hit = time.monotonic()
        os.kill(victims["kill"], signal.SIGKILL)
        os.kill(victims["stop"], signal.SIGSTOP)
        for how, job in jobs.items():
            output, _ = job.communicate(timeout=timeout_s + 40 + 30)
            elapsed = time.monotonic() - hit
            assert job.returncode != 0, output
            assert elapsed <= timeout_s + 40, (how, elapsed)
            assert "rank      : 1" in output or "rank 1" in output, output[-3000:]
            assert _gone(victims[how]), f"{how}: rank 1 (pid {victims[how]}) outlived the job"
    finally:
        for how, job in jobs.items():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
            if how in victims and victims[how] and not _gone(victims[how]):
                os.kill(victims[how], signal.SIGCONT)
                os.kill(victims[how], signal.SIGKILL)


def test_time_based_checkpoints_are_agreed_by_every_rank(tmp_path, corpus_cache):
    """``checkpoint.every_minutes`` goes by rank 0's clock alone; the flag rides the step's
    all-reduce, so every rank writes the same (collective, sharded) checkpoints and none hangs."""
    overrides = (*COMMON, *HALF, "distributed.strategy=fsdp2", "checkpoint.every_minutes=1e-9",
                 "checkpoint.keep_last=null", "training.max_steps=3")
    (run, _) = run_workers(_train, 2, tmp_path, corpus_cache, overrides)
    saved = sorted(p.name for p in (Path(run["run_dir"]) / "checkpoints").glob("step_*"))
    assert saved == ["step_1", "step_2", "step_3"]


def _fp16_under(rank: int, world_size: int, out: Path, cache: Path, strategy: str) -> str:
    from Ava.training import EnhancedModularTrainer

    try:
        EnhancedModularTrainer.from_config(tiny_config(out, cache, *COMMON, *HALF, "precision.dtype=fp16",
                                                       strategy)).train()
    except AvaConfigError as err:
        return str(err)
    return "trained"


@pytest.mark.parametrize("strategy", ["distributed.strategy=fsdp2", "distributed.expert_parallel=2"])
def test_fp16_is_refused_where_the_ranks_could_disagree_on_the_loss_scale(strategy, tmp_path, corpus_cache):
    messages = run_workers(_fp16_under, 2, tmp_path, corpus_cache, strategy)
    assert all(m.startswith("precision.dtype: fp16 runs on one process or under ddp") for m in messages), messages


def test_fp16_under_ddp_trains_and_the_ranks_agree(tmp_path, corpus_cache):
    (run, _) = run_workers(_train, 2, tmp_path, corpus_cache,
                           (*COMMON, *HALF, "precision.dtype=fp16", "distributed.strategy=ddp"))
    rows = _train_rows(run["run_dir"])
    assert rows[STEPS]["loss_scale"] == 2.0**16 and all(r["overflow"] == 0.0 for r in rows.values())
