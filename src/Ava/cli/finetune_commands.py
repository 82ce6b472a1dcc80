"""``ava merge-lora``: fold a LoRA fine-tune's adapters into full weights (docs/finetuning.md).

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..data.records import plural
from .generation_commands import _add_no_verify, check_out_folder


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """``ava merge-lora RUN --out DIR``: base + adapters as one Ava model folder.

    The folder holds ``model.safetensors``, ``config.yaml`` and the tokenizer, so ``ava generate``,
    ``eval``, ``export`` and ``quantize`` (and ``finetune.base`` of a next fine-tune) read it.

    Raises:
        AvaConfigError: ``RUN`` is not a LoRA fine-tune, or ``--out`` is a non-empty folder
            without ``--force``.
        AvaCheckpointError: missing or damaged checkpoint, or its base changed or is gone.
    """
    from ..config.checkpoint_layout import TOKENIZER_FILE, WEIGHTS_FILE, resolve_checkpoint
    from ..errors import AvaConfigError
    from ..interop.huggingface import describe_written
    from ..layers.lora import LORA_FILE, read_lora
    from ..models import EnhancedMoEModel

    check_out_folder(args.out, args.force)  # before any loading
    checkpoint = resolve_checkpoint(args.path)
    lora = read_lora(checkpoint)
    if lora is None:
        raise AvaConfigError(f"{checkpoint} has no {LORA_FILE}: it is not a LoRA fine-tune, so there is nothing "
                             "to merge; it already loads as a full model")
    model = EnhancedMoEModel.from_pretrained(checkpoint, verify=not args.no_verify)  # base + adapters, merged
    out = model.save_pretrained(Path(args.out).expanduser())
    written = [WEIGHTS_FILE, "config.yaml"]
    if (checkpoint / TOKENIZER_FILE).is_file():
        shutil.copyfile(checkpoint / TOKENIZER_FILE, out / TOKENIZER_FILE)
        written.append(TOKENIZER_FILE)
    quant = "" if lora["base_quant"] == "none" else f" (base dequantized from {lora['base_quant']})"
    print(f"merged {plural(len(lora['modules']), 'adapted module')} of {checkpoint} into {lora['base']}{quant}: "
          f"{model.num_parameters():,} parameters in {out} ({describe_written(out, written)})")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``merge-lora``."""
    merge = sub.add_parser("merge-lora", parents=[common],
                           help="fold a LoRA fine-tune's adapters into its base: a full model folder")
    merge.add_argument("path", help="the fine-tune's run folder or checkpoint folder")
    merge.add_argument("--out", required=True, help="Ava model folder to write")
    merge.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    _add_no_verify(merge)
    merge.set_defaults(func=cmd_merge_lora)
