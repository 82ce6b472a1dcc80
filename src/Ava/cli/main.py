"""The ``ava`` command line: subcommands mapped to plain functions.

Every user error (bad config, path or argument) is printed as one ``error: ...`` line and exits
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from ..errors import AvaError

EXIT_USER_ERROR = 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """``ava train CONFIG [key=value ...]``."""
    from ..config import load_config
    from ..models import EnhancedMoEModel
    from ..training import EnhancedModularTrainer
    from ..training.run_manager import seed_everything
    from ..utils.logging import setup_logging

    setup_logging()
    config = load_config(args.config, args.overrides)
    seed_everything(config.run.seed)  # the model's initialisation is part of the run
    model = EnhancedMoEModel(config.model)
    summary = EnhancedModularTrainer(model, config).train()
    print(json.dumps({k: v for k, v in summary.to_dict().items() if k != "sample"}, indent=2))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """``ava config check CONFIG``: validate, print warnings, exit 0 when usable."""
    from ..config import check_compatibility, load_config

    config = load_config(args.config, args.overrides)
    warnings = [i for i in check_compatibility(config, environment=True) if i.severity == "warning"]
    for issue in warnings:
        print(f"warning: {issue}")
    print(f"{args.config}: OK" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """``ava config show CONFIG``: the resolved config (defaults and derived sizes filled in)."""
    from ..config import load_config

    sys.stdout.write(load_config(args.config, args.overrides, check_environment=False).to_yaml())
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


def cmd_generate(args: argparse.Namespace) -> int:
    """``ava generate RUN_DIR|CKPT --prompt TEXT``."""
    from ..generation import TextGenerator

    generator = TextGenerator.from_pretrained(args.path, device=args.device)
    text = generator.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    print(text)
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``ava`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subparser's default must not overwrite a --debug given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    parser = _ArgumentParser(prog="ava", parents=[common],
                             description="Train, inspect and sample Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    train = sub.add_parser("train", parents=[common], help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. training.learning_rate=3e-4 model.moe.top_k=1")
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

    gen = sub.add_parser("generate", parents=[common], help="generate text from a run or checkpoint")
    gen.add_argument("path", help="run folder (uses checkpoints/latest) or checkpoint folder")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=100, help="tokens to generate (default 100)")
    gen.add_argument("--temperature", type=_non_negative, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=_probability, default=None, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (no KV cache)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ava`` console script and ``python -m Ava``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AvaError as err:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
