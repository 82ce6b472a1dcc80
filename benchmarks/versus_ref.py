"""A/B speed of this working tree's Ava ("new") against another commit's ("old"), in the same run.

For a refactor that must not be slower than the commit before it. ``--ref`` (default ``HEAD``)
is checked out with ``git worktree add --detach`` into a temporary folder, removed at the end
(also on an error or Ctrl-C); ``--old-src PATH`` uses an existing tree instead. The new side is
the ``src/`` next to this script, uncommitted changes included.

Workloads (``--workloads``, default both):
- ``step``: one full training step of :class:`EnhancedMoEModel` on a random (batch, seq-len)
  token batch: forward with labels, ``.loss`` backward, ``clip_grad_norm_(1.0)``, the optimizer of
  ``build_optimizer(model, OptimizerConfig(), lr, cpu)`` (AdamW, as ``ava train``), ``zero_grad``
  (``bench_common.training_step``).
- ``layer``: ``MoEBlock(model config)`` forward + backward (the sum of ``.hidden_states``) on a
  random (batch, seq-len, hidden) input that needs its gradient, as inside a model.

Shapes as in ``train_throughput.py`` (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 8192,
batch 8 × 256): ``8x2`` = 8 experts top-2, moe_intermediate 512; ``64x8`` = 64 experts top-8,
moe_intermediate 128; any ``ExK`` works (moe_intermediate 1024 / K, the same active expert
parameters, unless ``--moe-intermediate``). bf16 is ``torch.autocast("cpu", bfloat16)`` over fp32
weights, as Ava trains. Every other model setting is each tree's default.

Each side of each (workload, shape, dtype) runs in its own ``spawn`` worker process whose first act
is to put its tree's ``src/`` first on ``sys.path``; the worker checks that every ``Ava`` module it
loaded lies in that tree, and applies the same ``--threads`` / ``--allocator`` (``bench_common``).
Both sides use this tree's ``bench_common`` (the same step code). Both build their model seeded
alike and then load the state_dict the parent saved from the new tree's model, so they compute the
same thing: the init loss (``step``) or output (``layer``) of both sides is printed before timing
and must agree (fp32: relative difference ≤ ``--tol``) unless the refactor changed the numerics on
purpose; a state_dict the old tree cannot load (renamed parameters) is reported and both then start
from the seed alone. After ``--warmup`` untimed rounds, each of ``--repeats`` rounds times
``--steps`` consecutive steps (layer: ``--layer-steps`` calls) on each side, one side at a time,
the side that goes first alternating; the table gives each side's median ms per step and the
ratio new ÷ old round by round (the two sides of a round divided, so the machine's drift between
rounds cancels): median, quartiles and range. Ratio < 1: the new tree is faster. Results go to
docs/performance.md.

    python benchmarks/versus_ref.py                                    # vs HEAD: both workloads, shapes, dtypes
    python benchmarks/versus_ref.py --ref HEAD~3 --workloads step --shapes 8x2 --dtypes bf16
    python benchmarks/versus_ref.py --old-src /tmp/ava_base --repeats 20
    python benchmarks/versus_ref.py --quick                            # smoke run: tiny shapes, 2 rounds
"""

from __future__ import annotations

# Only the standard library and torch at module level: a spawn worker re-imports this module
# before it has chosen its tree, so nothing here may import Ava (bench_common does).
import argparse
import contextlib
import multiprocessing as mp
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NEW_SRC = ROOT / "src"
# name → (experts, top_k, moe_intermediate_size), as train_throughput.py
SHAPES = {"8x2": (8, 2, 512), "64x8": (64, 8, 128)}
# flag → (default, --quick value); a flag given on the command line wins over both
SIZES = {"hidden": (256, 64), "layers": (4, 2), "heads": (4, 2), "kv_heads": (2, 1), "vocab": (8192, 512),
         "batch": (8, 2), "seq_len": (256, 32), "moe_intermediate": (None, 64),
         "warmup": (5, 1), "repeats": (10, 2), "steps": (2, 2), "layer_steps": (10, 2)}
WORKLOADS = ("step", "layer")


def parse_shape(name: str) -> tuple[int, int]:
    """``"64x8"`` → (64 experts, top-8)."""
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if not match:
        raise argparse.ArgumentTypeError(f"shape {name!r}: expected EXPERTSxTOPK, e.g. 8x2")
    experts, top_k = int(match[1]), int(match[2])
    if not 1 <= top_k <= experts:
        raise argparse.ArgumentTypeError(f"shape {name!r}: top-k must lie in 1..experts")
    return experts, top_k


def model_kwargs(args: argparse.Namespace, shape: str) -> dict:
    """``ModelConfig`` keyword arguments of a shape (plain data: the worker builds the config with
    its own tree's ``ModelConfig``)."""
    experts, top_k = parse_shape(shape)
    inter = args.moe_intermediate or (SHAPES[shape][2] if shape in SHAPES else max(1, 1024 // top_k))
    moe = {"top_k": top_k, "moe_intermediate_size": inter}
    if args.moe_backend:
        moe["backend"] = args.moe_backend
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, num_experts=experts, max_seq_len=args.seq_len, moe=moe)


@dataclass(frozen=True)
class Job:
    """What one worker builds and times (plain data and tensors only: unpickling it in the worker
    must not import Ava before the worker has chosen its tree)."""

    workload: str  # "step" or "layer"
    dtype: str  # "fp32" or "bf16"
    config: dict  # ModelConfig keyword arguments
    weights: str  # the parent's saved state_dict (new tree)
    inputs: torch.Tensor  # (B, T) token ids (step) or (B, T, D) hidden states (layer)
    lr: float
    threads: int | None
    allocator: str


# ---------------------------------------------------------------------------------------------
# Worker side


def _check_tree(src: Path) -> None:
    """Fail unless every loaded ``Ava`` module comes from ``src``."""
    stray = [f"{name} ({getattr(mod, '__file__', None)})" for name, mod in list(sys.modules.items())
             if (name == "Ava" or name.startswith("Ava.")) and getattr(mod, "__file__", None)
             and not Path(mod.__file__).resolve().is_relative_to(src)]
    if stray:
        raise RuntimeError(f"Ava modules from outside {src}: {', '.join(stray[:5])}")


def _load_weights(module: torch.nn.Module, path: str) -> str:
    """Load the parent's state_dict if this tree's module has exactly its names and shapes;
    otherwise keep the seeded init and say why."""
    state = torch.load(path, weights_only=True)
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        return (f"seed only (state_dict differs: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}, reshaped {reshaped[:3]})")
    module.load_state_dict(state)
    return "shared"


def _build(job: Job):
    """(step function, init value, weights note) of a job, in this worker's tree."""
    from bench_common import training_step

    from Ava.config import ModelConfig, OptimizerConfig

    bf16 = job.dtype == "bf16"
    cfg = ModelConfig(**job.config)
    torch.manual_seed(0)
    if job.workload == "step":
        from Ava.models import EnhancedMoEModel
        from Ava.optimization import build_optimizer

        model = EnhancedMoEModel(cfg)
        note = _load_weights(model, job.weights)
        model.train()
        batch = job.inputs
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            init = model(input_ids=batch, labels=batch).loss.float().item()
        optimizer = build_optimizer(model, OptimizerConfig(), job.lr, torch.device("cpu"))
        return training_step(model, optimizer, batch, bf16), init, note

    from Ava.layers.moe import MoEBlock

    block = MoEBlock(cfg)
    note = _load_weights(block, job.weights)
    block.train()
    params = [p for p in block.parameters() if p.requires_grad]
    x_BTD = job.inputs.clone().requires_grad_(True)
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        init = block(x_BTD).hidden_states.float()

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y_BTD = block(x_BTD).hidden_states
        loss = y_BTD.float().sum()
        loss.backward()
        for p in params:
            p.grad = None
        x_BTD.grad = None
        return loss.detach()

    return step, init, note


def worker(conn: Connection, src: str, job: Job) -> None:
    """One side of one (workload, shape, dtype) in its own process: choose the tree, build, report
    ``ready`` (or ``error``), then time steps on request until ``None``, answering with the final
    step's value."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    try:
        tree = Path(src).resolve()
        _check_tree(tree)  # nothing of Ava may be loaded yet (this module must not import it)
        sys.path.insert(0, str(tree))
        import Ava

        if not Path(Ava.__file__).resolve().is_relative_to(tree):
            raise RuntimeError(f"imported Ava from {Ava.__file__}, not from {tree}")
        from bench_common import apply_cpu_args

        apply_cpu_args(argparse.Namespace(threads=job.threads, allocator=job.allocator))
        step, init, note = _build(job)
        step()  # the first step here, so a side that cannot run fails before timing
        _check_tree(tree)
        info = {"ava": str(Path(Ava.__file__).resolve().parent), "threads": torch.get_num_threads(),
                "interop": torch.get_num_interop_threads(), "init": init, "weights": note}
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the row loudly
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", info))
    last = None
    while (steps := conn.recv()) is not None:
        start = time.perf_counter()
        for _ in range(steps):
            last = step()
        conn.send((time.perf_counter() - start) / steps)
    conn.send(None if last is None else last.float().item())


# ---------------------------------------------------------------------------------------------
# Parent side


@dataclass
class Side:
    """The parent's handle on one worker."""

    name: str  # "new" or "old"
    process: mp.process.BaseProcess
    conn: Connection
    info: dict
    times: list[float] = field(default_factory=list)
    final: float | None = None

    def run(self, steps: int) -> float:
        try:
            self.conn.send(steps)
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join()
            raise RuntimeError(f"the {self.name} worker died (exit code {self.process.exitcode})") from None

    def close(self, graceful: bool) -> None:
        if graceful:
            with contextlib.suppress(OSError, EOFError):
                self.conn.send(None)
                self.final = self.conn.recv()
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def start_side(name: str, src: Path, job: Job) -> Side:
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    # daemon: no worker outlives an interrupted or failed run
    process = ctx.Process(target=worker, args=(child_conn, str(src), job), daemon=True, name=f"versus-{name}")
    process.start()
    child_conn.close()  # the worker's end lives in the worker only, so its death reads as EOF here
    try:
        status, payload = parent_conn.recv()
    except EOFError:
        process.join()
        status, payload = "error", f"the worker died while building (exit code {process.exitcode})"
    if status == "error":
        process.join(timeout=10)
        raise RuntimeError(f"{name} side ({src}):\n{payload}")
    return Side(name, process, parent_conn, payload)


def save_weights(workload: str, config: dict, path: Path) -> None:
    """The new tree's seeded module of a workload, saved for both workers to load."""
    from Ava.config import ModelConfig
    from Ava.layers.moe import MoEBlock
    from Ava.models import EnhancedMoEModel

    torch.manual_seed(0)
    cfg = ModelConfig(**config)
    module = EnhancedMoEModel(cfg) if workload == "step" else MoEBlock(cfg)
    torch.save(module.state_dict(), path)


def init_check(new: Side, old: Side, workload: str, dtype: str, args: argparse.Namespace) -> str:
    """Print both sides' init loss (step) or output (layer) and whether they agree; returns a
    short verdict for the table."""
    a, b = new.info["init"], old.info["init"]
    tol = args.tol if dtype == "fp32" else args.bf16_tol
    if workload == "step":
        rel = abs(a - b) / max(abs(b), 1e-12)
        shown = f"init loss new {a:.8f}, old {b:.8f}, relative difference {rel:.1e}"
    else:
        rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        shown = (f"init output RMS new {a.pow(2).mean().sqrt().item():.8f}, old {b.pow(2).mean().sqrt().item():.8f}, "
                 f"‖new − old‖ / ‖old‖ {rel:.1e}")
    ok = rel <= tol
    weights = new.info["weights"] if new.info["weights"] == old.info["weights"] == "shared" else (
        f"new {new.info['weights']}; old {old.info['weights']}")
    print(f"  Ava: new {new.info['ava']}, old {old.info['ava']} (checked in the workers); weights: {weights}")
    print(f"  {shown}: " + (f"agree (≤ {tol:g})" if ok else
                             f"DIFFER (> {tol:g}): the two trees do not compute the same thing, so the timings "
                             f"compare different work unless the numerics changed on purpose"))
    return "agree" if ok else f"DIFFER {rel:.0e}"


def run_block(args: argparse.Namespace, old_src: Path, tmp: Path, workload: str, shape: str, dtype: str,
              inputs: dict[str, torch.Tensor]) -> dict:
    config = model_kwargs(args, shape)
    weights = tmp / f"{workload}-{shape}.pt"
    if not weights.exists():
        save_weights(workload, config, weights)
    token_batch = inputs["tokens"]
    x = inputs["hidden"] if workload == "layer" else token_batch
    job = Job(workload, dtype, config, str(weights), x, args.lr, args.threads, args.allocator)
    steps = args.steps if workload == "step" else args.layer_steps
    sides: list[Side] = []
    graceful = False
    try:
        for name, src in (("new", NEW_SRC), ("old", old_src)):  # built one at a time: no competing for the cores
            sides.append(start_side(name, src, job))
        new, old = sides
        for side, src in ((new, NEW_SRC), (old, old_src)):
            if not Path(side.info["ava"]).is_relative_to(src.resolve()):
                raise RuntimeError(f"{side.name} worker ran Ava from {side.info['ava']}, not {src}")
        if (new.info["threads"], new.info["interop"]) != (old.info["threads"], old.info["interop"]):
            raise RuntimeError(f"thread counts differ: new {new.info['threads']}/{new.info['interop']}, "
                               f"old {old.info['threads']}/{old.info['interop']} (intra/inter-op)")
        check = init_check(new, old, workload, dtype, args)
        for r in range(args.warmup + args.repeats):
            order = (new, old) if r % 2 == 0 else (old, new)
            for side in order:
                elapsed = side.run(steps)
                if r >= args.warmup:
                    side.times.append(elapsed)
        graceful = True
    finally:
        for side in sides:
            side.close(graceful)
    if workload == "step" and new.final is not None and old.final is not None:
        done = 1 + (args.warmup + args.repeats) * steps
        print(f"  loss after {done} steps: new {new.final:.6f}, old {old.final:.6f}")
    ratios = [n / o for n, o in zip(new.times, old.times)]
    return {"workload": workload, "shape": shape, "dtype": dtype, "new_ms": statistics.median(new.times) * 1e3,
            "old_ms": statistics.median(old.times) * 1e3, "ratios": ratios, "check": check, "steps": steps}


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def verdict(row: dict) -> str:
    ratios = row["ratios"]
    med = statistics.median(ratios)
    q1, q3 = quartiles(ratios)
    if len(ratios) < 5:
        reading = "too few rounds to judge"
    else:
        reading = "new faster" if q3 < 1 else "new SLOWER" if q1 > 1 else "no clear difference (IQR spans 1)"
    return (f"{row['workload']} {row['shape']} {row['dtype']}: new ÷ old {med:.2f}× (median of {len(ratios)} "
            f"rounds, IQR {q1:.2f}–{q3:.2f}, range {min(ratios):.2f}–{max(ratios):.2f}): {reading}")


@contextlib.contextmanager
def old_tree(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[Path, str]]:
    """(the old side's ``src/``, its description): ``--old-src``, or a temporary worktree of ``--ref``."""
    if args.old_src:
        path = Path(args.old_src).resolve()
        src = path / "src" if (path / "src" / "Ava").is_dir() else path
        if not (src / "Ava" / "__init__.py").is_file():
            raise SystemExit(f"--old-src {args.old_src}: no Ava package in it or in its src/")
        yield src, f"{src} (--old-src)"
        return
    git = ["git", "-C", str(ROOT)]
    try:
        sha = subprocess.run(git + ["rev-parse", "--verify", "--quiet", f"{args.ref}^{{commit}}"], check=True,
                             capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"--ref {args.ref}: not a commit of {ROOT}") from None
    subject = subprocess.run(git + ["log", "-1", "--format=%h %s", sha], capture_output=True, text=True).stdout.strip()
    path = tmp / "ref"
    try:
        subprocess.run(git + ["worktree", "add", "--detach", "--quiet", str(path), sha], check=True)
        yield path / "src", f"{args.ref} = {subject[:90]} (temporary worktree {path})"
    finally:
        if path.exists():
            removed = subprocess.run(git + ["worktree", "remove", "--force", str(path)], capture_output=True, text=True)
            if removed.returncode != 0:
                print(f"could not remove the worktree {path}: {removed.stderr.strip()} "
                      f"(`git worktree prune` after deleting it)", file=sys.stderr)


def describe_new() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
    changed = len(dirty.splitlines())
    return f"{NEW_SRC} (HEAD {head or '?'}" + (f" + {changed} changed paths under src/)" if changed else ", clean)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    sys.path.insert(0, str(NEW_SRC))  # the parent (and its saved weights) use the new tree
    from bench_common import add_cpu_args, apply_cpu_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="the old side: a commit, checked out in a temporary worktree")
    parser.add_argument("--old-src", default=None, metavar="PATH",
                        help="the old side from an existing tree (its root or its src/) instead of --ref")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--shapes", nargs="+", default=["8x2", "64x8"],
                        help="EXPERTSxTOPK; 8x2 and 64x8 as in train_throughput.py")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shapes, 1 warm-up round, 2 rounds of 2 steps (flags given win)")
    for name, (default, quick) in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=(f"default {default}" if default is not None
                                  else "default: the shape's (8x2: 512, 64x8: 128, others 1024 / top-k)")
                            + (f", --quick {quick}" if quick != default else ""))
    parser.add_argument("--moe-backend", default=None, choices=["loop", "batched", "grouped", "auto"],
                        help="model.moe.backend on both sides; default: each tree's default")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tol", type=float, default=1e-6,
                        help="fp32: the largest relative difference of the init loss / output that counts as agreeing")
    parser.add_argument("--bf16-tol", type=float, default=1e-2, help="the same under bf16 autocast")
    add_cpu_args(parser, "; the same in both workers")
    args = parser.parse_args()
    for name, (default, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    for shape in args.shapes:
        try:
            parse_shape(shape)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    if args.repeats < 1 or args.steps < 1 or args.layer_steps < 1 or args.warmup < 0:
        parser.error("--repeats, --steps and --layer-steps must be ≥ 1, --warmup ≥ 0")
    apply_cpu_args(args)
    import Ava

    if not Path(Ava.__file__).resolve().is_relative_to(NEW_SRC):
        raise SystemExit(f"the parent imported Ava from {Ava.__file__}, not {NEW_SRC}")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so the worktree is removed on kill too
    signal.signal(signal.SIGHUP, _raise_interrupt)

    gen = torch.Generator().manual_seed(1)
    inputs = {"tokens": torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen),
              "hidden": torch.randn(args.batch, args.seq_len, args.hidden, generator=gen)}
    rows: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ava-versus-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with old_tree(args, tmp) as (old_src, old_desc):
                allocator_new, allocator_old = (p / "Ava" / "utils" / "allocator.py" for p in (NEW_SRC, old_src))
                print(f"new: {describe_new()}\nold: {old_desc}")
                print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator {args.allocator} "
                      f"(both workers); hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
                      f"{args.kv_heads} KV heads, vocab {args.vocab}, batch {args.batch} × {args.seq_len}; "
                      f"step: OptimizerConfig() defaults, lr {args.lr:g}; {args.warmup} warm-up + {args.repeats} "
                      f"timed rounds of {args.steps} steps (layer: {args.layer_steps} calls) per side")
                if args.allocator == "tuned" and (not allocator_old.is_file()
                                                  or allocator_new.read_bytes() != allocator_old.read_bytes()):
                    print("warning: Ava/utils/allocator.py differs between the trees: each worker tunes the "
                          "allocator with its own tree's tune_cpu_allocator (use --allocator default to rule it out)")
                for workload in args.workloads:
                    for shape in args.shapes:
                        for dtype in args.dtypes:
                            print(f"\n{workload} {shape} {dtype}:", flush=True)
                            try:
                                rows.append(run_block(args, old_src, tmp, workload, shape, dtype, inputs))
                            except RuntimeError as err:
                                failed.append(f"{workload} {shape} {dtype}")
                                print(f"  FAILED: {err}", flush=True)
                                if "imported Ava from" in str(err) or "Ava modules from outside" in str(err):
                                    raise
        except KeyboardInterrupt:
            print("\ninterrupted; removing the worktree", file=sys.stderr)
            raise SystemExit(130) from None

    if rows:
        print("\n| workload | shape | dtype | new ms/step | old ms/step | new ÷ old | IQR | range | init |")
        print("|---|---|---|---:|---:|---:|---:|---:|---|")
        for row in rows:
            q1, q3 = quartiles(row["ratios"])
            print(f"| {row['workload']} | {row['shape']} | {row['dtype']} | {row['new_ms']:.1f} | "
                  f"{row['old_ms']:.1f} | {statistics.median(row['ratios']):.2f}× | {q1:.2f}–{q3:.2f} | "
                  f"{min(row['ratios']):.2f}–{max(row['ratios']):.2f} | {row['check']} |")
        print()
        for row in rows:
            print(verdict(row))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
