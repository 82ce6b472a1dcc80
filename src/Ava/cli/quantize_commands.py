"""``ava quantize``: post-training weight quantization of a checkpoint (docs/quantization.md).

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AvaCheckpointError, AvaConfigError
from ..utils.output_paths import check_output_dir

if TYPE_CHECKING:
    from ..evaluation.comprehensive_eval import ValidationSplit
    from ..models import EnhancedMoEModel

GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 64  # = Ava.layers.quantized.DEFAULT_INT4_GROUP_SIZE (cli imports stay light)


_NO_EVAL = ("--no-eval", "to quantize without the perplexity comparison")  # the way around a missing split


def validation_split(checkpoint: Path, max_tokens: int = 200_000) -> ValidationSplit:
    """The run's validation split, rebuilt as ``ava eval`` does
    (:func:`~Ava.evaluation.comprehensive_eval.validation_split`), capped at ``max_tokens``.

    Raises:
        AvaDataError: no full training config in the checkpoint, or no validation split
            (the message points at ``--no-eval``).
    """
    from ..evaluation.comprehensive_eval import validation_config, validation_split as rebuild

    return rebuild(checkpoint, validation_config(checkpoint, *_NO_EVAL), max_tokens, _NO_EVAL[0])


def validation_perplexity(split: ValidationSplit, model: EnhancedMoEModel, *, show: bool | None = None,
                          desc: str = "validation") -> float:
    """Perplexity of ``model`` (full precision or quantized) on ``split``, scored as ``ava eval`` does.

    Args:
        split: from :func:`validation_split`.
        model: the model to score.
        show: show the progress bar (None = when stderr is a terminal).
        desc: the progress bar's label.

    Returns:
        The perplexity.
    """
    from ..evaluation.validation import validation_loss
    from ..utils.progress import progress_bar

    with progress_bar(split.windows, desc, "window", show=show) as bar:
        result = validation_loss(model, split.dataset, batch_size=split.batch_size, max_batches=split.max_batches,
                                 device="cpu", autocast_dtype=split.autocast_dtype,
                                 document_mask=split.document_mask, on_batch=bar.update)
    return float(result["ppl"])


def default_output(checkpoint: Path, scheme: str, group_size: int | None) -> Path:
    """``<checkpoint>-int8``, ``<checkpoint>-int4-g64``, ``<checkpoint>-fp8``: next to the checkpoint."""
    suffix = f"{scheme}-g{group_size}" if group_size else scheme
    return checkpoint.parent / f"{checkpoint.name}-{suffix}"


def cmd_quantize(args: argparse.Namespace) -> int:
    """``ava quantize RUN_OR_CKPT --int8 | --int4 [--group-size N] | --fp8 [--out DIR] [--no-eval]``."""
    from ..config.checkpoint_layout import WEIGHTS_FILE, resolve_checkpoint
    from ..layers.lora import LORA_FILE
    from ..layers.quantized import read_quantization
    from ..models import EnhancedMoEModel
    from ..optimization.quantization import quantize_model, save_quantized, state_bytes

    scheme = args.scheme
    if args.group_size is not None and scheme != "int4":
        raise AvaConfigError(f"--group-size applies to --int4 only, not to --{scheme}")
    group_size = (args.group_size or DEFAULT_INT4_GROUP_SIZE) if scheme == "int4" else None
    checkpoint = resolve_checkpoint(args.path)
    if read_quantization(checkpoint) is not None:
        raise AvaCheckpointError(f"{checkpoint} is already quantized; quantize its full-precision checkpoint")
    out = Path(args.out) if args.out else default_output(checkpoint, scheme, group_size)
    if out.resolve() == checkpoint:
        raise AvaConfigError(f"--out {out} is the checkpoint itself; choose another folder")
    check_output_dir(out, "quantized checkpoint folder")
    if not args.no_eval:
        from ..evaluation.comprehensive_eval import validation_config

        validation_config(checkpoint, *_NO_EVAL)  # no validation split: say so before any work

    model = EnhancedMoEModel.from_pretrained(checkpoint, verify=not args.no_verify)  # a LoRA fine-tune: merged
    full_bytes = state_bytes(model)  # before quantizing (a fine-tune's own file holds only its adapters)
    split = None if args.no_eval else validation_split(checkpoint, args.max_tokens)
    ppl_before = None if split is None else validation_perplexity(split, model, desc="validation (full precision)")
    spec = quantize_model(model, scheme, group_size)
    save_quantized(model, spec, out, checkpoint)
    quantized = EnhancedMoEModel.from_pretrained(out)  # scored as loaded: the round trip is checked too
    ppl_after = None if split is None else validation_perplexity(split, quantized, desc=f"validation ({scheme})")

    name = f"{scheme} (group size {group_size})" if group_size else scheme
    before = full_bytes if (checkpoint / LORA_FILE).is_file() else (checkpoint / WEIGHTS_FILE).stat().st_size
    after = (out / WEIGHTS_FILE).stat().st_size
    print(f"quantized {len(spec['modules'])} modules to {name}; full precision: {spec['full_precision']}")
    print(f"size: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({after / before:.3f}x)")
    if ppl_before is not None and ppl_after is not None:
        change = 100 * (ppl_after / ppl_before - 1)
        print(f"validation perplexity: {ppl_before:.3f} -> {ppl_after:.3f} ({change:+.2f}%)")
    print(f"wrote {out} (ava generate / ava eval / EnhancedMoEModel.from_pretrained load it)")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``quantize`` on the ``ava`` subparsers."""
    from .arg_types import positive_int
    from .generation_commands import _add_no_verify

    qp = sub.add_parser("quantize", parents=[common], help="INT8 / INT4 / FP8 weight quantization of a checkpoint",
                        description="Quantize a checkpoint's weights (attention, MLPs, experts, embedding and output "
                                    "head; routers and norms stay full precision) into a new checkpoint folder, and "
                                    "print the file size and validation perplexity before and after. "
                                    "See docs/quantization.md.")
    qp.add_argument("path", help="run folder (uses checkpoints/latest) or checkpoint folder")
    schemes = qp.add_mutually_exclusive_group(required=True)
    schemes.add_argument("--int8", dest="scheme", action="store_const", const="int8",
                         help="INT8, symmetric, one scale per output channel")
    schemes.add_argument("--int4", dest="scheme", action="store_const", const="int4",
                         help="INT4, asymmetric, one scale and zero per --group-size weights")
    schemes.add_argument("--fp8", dest="scheme", action="store_const", const="fp8",
                         help="FP8 (e4m3fn), one scale per output channel")
    qp.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                    help=f"int4 group size (default {DEFAULT_INT4_GROUP_SIZE})")
    qp.add_argument("--out", default=None,
                    help="output folder (default: next to the checkpoint, CHECKPOINT-int8, CHECKPOINT-int4-g64, ...)")
    qp.add_argument("--no-eval", action="store_true", help="skip the validation perplexity before/after")
    qp.add_argument("--max-tokens", type=positive_int, default=200_000,
                    help="validation tokens scored at most (default 200,000)")
    _add_no_verify(qp)
    qp.set_defaults(func=cmd_quantize)
