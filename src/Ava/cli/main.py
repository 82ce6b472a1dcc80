"""The ``ava`` command line: subcommands mapped to plain functions.

Every user error (bad config, path or argument) is printed as one ``error: ...`` line and exits
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__
from ..errors import AvaError
from .arg_types import positive_int

EXIT_USER_ERROR = 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """``ava train CONFIG [key=value ...] [--nproc N]``.

    ``--nproc N`` (N > 1) starts ``torchrun --standalone --nproc_per_node N -m Ava train ...`` on
    this machine; a process that ``torchrun`` started (``WORLD_SIZE`` > 1) trains as one rank.
    """
    from ..training.distributed_manager import launched_world_size

    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..training.launch import launch_local

        argv = ["train", args.config, *args.overrides]
        argv += ["--resume", args.resume] if args.resume is not None else []
        argv += ["--debug"] if getattr(args, "debug", False) else []
        return launch_local(args.nproc, argv)
    if launched_world_size() > 1:
        _train_rank(args)  # ends the process
    from ..config import load_config
    from ..training import EnhancedModularTrainer
    from ..utils.logging import setup_logging

    setup_logging()
    config = load_config(args.config, args.overrides)
    summary = EnhancedModularTrainer.from_config(config).train(resume=args.resume)
    print(json.dumps({k: v for k, v in summary.to_dict().items() if k != "sample"}, indent=2))
    return 0


def _train_rank(args: argparse.Namespace) -> NoReturn:
    """One rank of a ``torchrun`` job: an error on any rank is reported once, naming the rank (in
    ``torchrun``'s summary), every rank exits non-zero, and the process leaves without Python's
    teardown (:mod:`~Ava.training.rank_aware_error_handler`)."""
    from ..config import load_config
    from ..training import EnhancedModularTrainer
    from ..training.rank_aware_error_handler import RankErrors, finish_process
    from ..utils.logging import setup_logging

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    guard = RankErrors(rank, world_size)
    with guard:
        setup_logging(console_level=None if rank == 0 else "ERROR")
        config = load_config(args.config, args.overrides)
        trainer = EnhancedModularTrainer.from_config(config)
        try:
            summary = trainer.train(resume=args.resume, on_step=guard.heartbeat)
        finally:  # a failure's traceback goes to this rank's own log
            if trainer.paths is not None:
                guard.log_file = trainer.paths.root / "logs" / f"train.rank{rank}.log"
        if rank == 0:
            print(json.dumps({k: v for k, v in summary.to_dict().items() if k != "sample"}, indent=2), flush=True)
    finish_process(guard.exit_code, clean=guard.exit_code == 0)


def cmd_config_check(args: argparse.Namespace) -> int:
    """``ava config check CONFIG``: validate, print warnings and the memory estimate, exit 0 when
    usable; exit 2 (one ``error:`` line) when ``run.output_dir`` cannot be written or the run cannot
    fit this machine's memory (:func:`~Ava.training.memory_estimate.check_fits`, with the estimate)."""
    from ..config import check_compatibility, load_config
    from ..training.memory_estimate import check_fits, estimate_memory
    from ..utils.output_paths import check_output_dir

    config = load_config(args.config, args.overrides)
    if config.finetune is not None:  # the base's architecture (and a missing base, reported here)
        from ..training.finetune import adopt_base

        config, _ = adopt_base(config)
    warnings = [i for i in check_compatibility(config, environment=True) if i.severity == "warning"]
    for issue in warnings:
        print(f"warning: {issue}")
    check_output_dir(config.run.output_dir, "run.output_dir")
    print("\n".join(estimate_memory(config).describe()), flush=True)
    check_fits(config, config.run.device)
    print(f"{args.config}: OK" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """``ava config show CONFIG``: the resolved config (defaults and derived sizes filled in),
    then the memory estimate as a block of YAML comments (the output stays valid YAML)."""
    from ..config import load_config
    from ..training.memory_estimate import estimate_memory

    config = load_config(args.config, args.overrides, check_environment=False)
    sys.stdout.write(config.to_yaml())
    sys.stdout.write("".join(f"# {line}".rstrip() + "\n" for line in ["", *estimate_memory(config).describe()]))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    """``ava config schema``: the JSON schema of the config."""
    from ..config import EnhancedTrainingConfig

    print(json.dumps(EnhancedTrainingConfig.model_json_schema(), indent=2))
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    """``ava config reference``: every key with its default and description, as YAML."""
    from ..config import render_reference_yaml

    sys.stdout.write(render_reference_yaml())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``ava report RUN_DIR``: PNG plots and a markdown summary in RUN_DIR/report/ (checked for
    writing before anything is drawn)."""
    from ..training.report import write_report

    out = write_report(args.run_dir)
    print(f"report written to {out}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    """``ava lr-find CONFIG [key=value ...]``: LR range test (a progress bar with ETA over its
    steps), plot, optional ``--write``. The plot file, and CONFIG under ``--write``, are checked for
    writing before the sweep starts."""
    import tempfile
    from pathlib import Path

    from ..config import load_config
    from ..data.records import plural
    from ..training.lr_finder import run_lr_finder, save_plot, write_learning_rate
    from ..utils.logging import setup_logging
    from ..utils.output_paths import check_output_file

    setup_logging()
    plot_path = check_output_file(args.plot or Path(args.config).with_suffix("").name + "_lr_find.png", "--plot")
    if args.write:
        check_output_file(args.config, "config file (--write)")
    config = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as work_dir:
        result = run_lr_finder(config, min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.steps,
                               work_dir=work_dir)
    if not result.suggestions:
        raise AvaError(f"the sweep diverged after {len(result.lrs)} step(s): lower --max-lr or --min-lr")
    plot = save_plot(result, plot_path)
    print(f"swept {plural(len(result.lrs), 'step')} from {result.lrs[0]:.2e} to {result.lrs[-1]:.2e}"
          + (" (stopped: loss diverged)" if result.diverged else ""))
    for name, lr in result.suggestions.items():
        print(f"  {name:<15} {lr:.2e}" + ("  <- --pick" if name == args.pick else ""))
    print(f"plot: {plot}")
    if args.write:
        write_learning_rate(args.config, result.suggestions[args.pick])
        print(f"{args.config}: training.learning_rate = {result.suggestions[args.pick]:.3g}")
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``ava`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subparser's default must not overwrite a --debug given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    parser = _ArgumentParser(prog="ava", parents=[common],
                             description="Train, inspect and sample Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"ava {__version__}",
                        help="print the version of Ava and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    train = sub.add_parser("train", parents=[common], help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. training.learning_rate=3e-4 model.moe.top_k=1 "
                            "(anywhere after CONFIG, also after options)")
    train.add_argument("--resume", metavar="auto|RUN_DIR|CKPT", default=None,
                       help="continue a run in its folder: auto = the newest run of this config's "
                            "run.name with a good checkpoint (a new run if none)")
    train.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                       help="train on N processes of this machine (starts torchrun --standalone; "
                            "see docs/distributed.md)")
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", parents=[common], help="check, show or describe configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=_ArgumentParser)
    for name, func, text in [
        ("check", cmd_config_check, "validate a config (exit 2 with the problems if it is not usable)"),
        ("show", cmd_config_show, "print the resolved config with every default filled in"),
    ]:
        p = config_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
        p.set_defaults(func=func)
    p = config_sub.add_parser("schema", parents=[common], help="print the JSON schema of the config")
    p.set_defaults(func=cmd_config_schema)
    p = config_sub.add_parser("reference", parents=[common],
                              help="print every key with its default and description (configs/reference.yaml)")
    p.set_defaults(func=cmd_config_reference)

    report = sub.add_parser("report", parents=[common], help="plots and a markdown summary of a run")
    report.add_argument("run_dir", help="run folder (runs/<name>_<time>)")
    report.set_defaults(func=cmd_report)

    lrf = sub.add_parser("lr-find", parents=[common], help="LR range test: suggest a learning rate")
    lrf.add_argument("config", help="YAML config file")
    lrf.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    lrf.add_argument("--min-lr", type=float, default=1e-6, help="first LR of the sweep (default 1e-6)")
    lrf.add_argument("--max-lr", type=float, default=1.0, help="last LR of the sweep (default 1)")
    lrf.add_argument("--steps", type=positive_int, default=100, help="sweep steps (default 100)")
    lrf.add_argument("--plot", default=None, help="PNG to write (default <config>_lr_find.png here)")
    lrf.add_argument("--pick", choices=["valley", "steepest", "min_loss_div10"], default="valley",
                     help="suggestion --write uses (default valley)")
    lrf.add_argument("--write", action="store_true", help="set training.learning_rate in CONFIG to the pick")
    lrf.set_defaults(func=cmd_lr_find)

    # generate, export, import (generation/interop commands); eval (evaluation)
    from .generation_commands import add_commands as add_generation_commands

    add_generation_commands(sub, common)

    # eval (evaluation commands)
    from .eval_commands import add_commands as add_eval_commands

    add_eval_commands(sub, common)

    # tokenizer train, prepare (data commands)
    from .data_commands import add_commands as add_data_commands

    add_data_commands(sub, common)

    # checkpoint consolidate (sharded checkpoints)
    from .checkpoint_commands import add_commands as add_checkpoint_commands

    add_checkpoint_commands(sub, common)

    # quantize (post-training quantization)
    from .quantize_commands import add_commands as add_quantize_commands

    add_quantize_commands(sub, common)

    # merge-lora (LoRA fine-tunes)
    from .finetune_commands import add_commands as add_finetune_commands

    add_finetune_commands(sub, common)
    return parser


def _parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes ``key=value`` overrides after options
    (``ava train CONFIG --resume auto training.max_steps=80``).

    argparse ends a ``nargs="*"`` positional at the first option, so later overrides come back as
    unrecognized; they join ``args.overrides`` in the order given. Anything else unrecognized
    (an unknown ``--option``, or words for a command without overrides) is still a usage error.
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ava`` console script and ``python -m Ava``."""
    parser = build_parser()
    args = _parse_args(parser, argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AvaError as err:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:
        # the trainer stops politely with KeyboardInterrupt("SIGTERM") or ("SIGINT"); a bare one is Ctrl-C
        if err.args and err.args[0] == signal.SIGTERM.name:
            print("terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM  # 143, the shell's code for a SIGTERM
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT  # 130


if __name__ == "__main__":
    sys.exit(main())
