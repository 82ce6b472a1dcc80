"""LoRA / QLoRA fine-tuning: the base model, its adoption into the config, and the adapters' state.

A config with a ``finetune`` section trains adapters (:mod:`Ava.layers.lora`) over a frozen base:

1. :func:`adopt_base` finds the base (an Ava run, checkpoint or model folder; a Hugging Face
   folder is imported once into ``<run.output_dir>/.bases/``) and returns the config with the
   base's ``model`` section and tokenizer, so sizes, vocabulary and the data's tokens are the base's.
2. :func:`build_finetune_model` loads the base weights, quantizes them (``base_quant``: QLoRA),
   puts the adapters on and freezes everything else.
3. :class:`AdapterWeights` is the registry's ``model`` part: a checkpoint's ``model.safetensors``
   holds the adapters only, and :func:`lora_spec` is its ``lora.json`` (the base, with its size
   and sha256, and the adapters' shape), which ``EnhancedMoEModel.from_pretrained`` reads to
   rebuild base + adapters (merged) for ``ava generate``, ``eval``, ``export`` and ``quantize``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import EnhancedTrainingConfig
from ..config.checkpoint_layout import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, describe_file, resolve_checkpoint
from ..config.loading import load_yaml
from ..config.model_config import ModelConfig
from ..errors import AvaCheckpointError, AvaConfigError
from ..layers.lora import LORA_FILE, adapt_base, adapter_state_dict, lora_modules
from ..models import EnhancedMoEModel
from ..utils.output_paths import check_output_dir

logger = logging.getLogger(__name__)

__all__ = ["AdapterWeights", "adopt_base", "base_identity", "build_finetune_model", "finetune_summary", "lora_spec"]


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: ``config.json`` and no Ava ``config.yaml``."""
    return (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file()


def _hf_base(hf_dir: Path, output_dir: str) -> Path:
    """An Ava model folder for a Hugging Face base, imported once under ``<output_dir>/.bases/``
    (keyed by the HF folder's name and its files' sizes and times, so an edited base is imported anew)."""
    from ..interop.huggingface import import_hf

    key = hashlib.sha256()
    for file in sorted(hf_dir.iterdir()):
        if file.is_file():
            stat = file.stat()
            key.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    bases = check_output_dir(Path(output_dir) / ".bases", "run.output_dir")
    target = bases / f"{hf_dir.resolve().name}-{key.hexdigest()[:12]}"
    if (target / WEIGHTS_FILE).is_file():
        return target
    tmp = bases / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import_hf(hf_dir, out=tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("finetune.base: imported the Hugging Face model %s into %s", hf_dir, target)
    return target


def base_folder(config: EnhancedTrainingConfig) -> Path:
    """The base's Ava checkpoint or model folder (a Hugging Face base imported first).

    Raises:
        AvaCheckpointError: no model at ``finetune.base``, naming the path and what it accepts.
    """
    path = Path(config.finetune.base).expanduser()
    if path.is_dir() and _is_hf_folder(path):
        return _hf_base(path, config.run.output_dir)
    try:
        folder = resolve_checkpoint(path)
    except AvaCheckpointError as err:
        raise AvaCheckpointError(f"finetune.base: {err}; a Hugging Face folder (config.json + safetensors) "
                                 "is accepted too") from None
    if (folder / LORA_FILE).is_file():
        raise AvaConfigError(f"finetune.base: {folder} is itself a LoRA fine-tune; merge it first "
                             f"(`ava merge-lora {path} --out DIR`) and use DIR as the base")
    return folder


def adopt_base(config: EnhancedTrainingConfig) -> tuple[EnhancedTrainingConfig, Path]:
    """The config a fine-tune trains with: the base's ``model`` section and tokenizer.

    Args:
        config: the user's config, with a ``finetune`` section.

    Returns:
        ``(config, base)``: a new config (``finetune.base`` resolved to the base's folder) and
        that folder.

    Raises:
        AvaConfigError: a ``model`` key or ``data.tokenizer.path`` set to something other than the
            base's (named, with the fix), or a base without a tokenizer.
        AvaCheckpointError: no model at ``finetune.base``.
    """
    from ..config.training_config import validate_config

    base = base_folder(config)
    try:
        base_model = ModelConfig.model_validate(load_yaml((base / CONFIG_FILE).read_text(encoding="utf-8"))["model"])
    except Exception as err:  # unreadable, no model section, invalid: the base's config is the problem
        raise AvaCheckpointError(f"finetune.base: cannot read the model section of {base / CONFIG_FILE} "
                                 f"({type(err).__name__}: {err}); re-save the base") from None
    for key in sorted(config.model.model_fields_set):
        mine, theirs = getattr(config.model, key), getattr(base_model, key)
        if mine != theirs:
            raise AvaConfigError(f"model.{key}: {mine!r}, but the fine-tune's architecture is the base's "
                                 f"({theirs!r} in {base / CONFIG_FILE}); remove model.{key}")
    tokenizer = base / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise AvaConfigError(f"finetune.base: {base} has no {TOKENIZER_FILE}; a fine-tune tokenizes with the "
                             "base's tokenizer, so copy it there")
    asked = config.data.tokenizer.path
    if asked is not None and Path(asked).resolve() != tokenizer.resolve():
        raise AvaConfigError(f"data.tokenizer.path: {asked}, but a fine-tune tokenizes with the base's "
                             f"tokenizer ({tokenizer}); remove data.tokenizer.path")
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["model"] = base_model.model_dump(mode="json")
    raw.setdefault("data", {}).setdefault("tokenizer", {})["path"] = str(tokenizer)
    raw["data"]["tokenizer"].pop("vocab_size", None)
    raw["finetune"]["base"] = str(base)
    return validate_config(raw, source="the fine-tune's config"), base


def build_finetune_model(config: EnhancedTrainingConfig, base: Path) -> EnhancedMoEModel:
    """The base's weights (quantized when ``finetune.base_quant`` asks), frozen, with LoRA adapters.

    Args:
        config: the adopted config (:func:`adopt_base`).
        base: the base's folder.

    Returns:
        The model in train mode; only the adapters require gradients.
    """
    ft = config.finetune
    model = EnhancedMoEModel.from_pretrained(base)
    lora = ft.lora
    try:
        adapt_base(model, ft.base_quant, ft.base_group_size, lora.rank, lora.alpha, lora.dropout, lora.targets,
                   seed=config.run.seed)
    except ValueError as err:
        raise AvaConfigError(str(err)) from None
    return model.train()


def finetune_summary(config: EnhancedTrainingConfig, model: nn.Module) -> str:
    """One log line: the base, the adapters and how many parameters train."""
    ft, lora = config.finetune, config.finetune.lora
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"fine-tune of {ft.base}: LoRA r={lora.rank} alpha={lora.alpha:g} on {len(lora_modules(model))} modules "
            f"({', '.join(lora.targets)}), {trainable:,} trainable parameters; base frozen"
            + ("" if ft.base_quant == "none" else f" and quantized to {ft.base_quant}"))


def lora_spec(config: EnhancedTrainingConfig, model: nn.Module, base_identity: dict[str, Any]) -> dict[str, Any]:
    """The ``lora.json`` of a fine-tune's checkpoints: how to rebuild base + adapters."""
    ft = config.finetune
    return {"format": 1, "base": ft.base, "base_weights": base_identity, "base_quant": ft.base_quant,
            "base_group_size": ft.base_group_size if ft.base_quant == "int4" else None,
            "rank": ft.lora.rank, "alpha": ft.lora.alpha, "dropout": ft.lora.dropout,
            "targets": list(ft.lora.targets), "modules": lora_modules(model)}


def base_identity(base: Path) -> dict[str, Any]:
    """Size and sha256 of the base's weights (checked when the fine-tune is loaded)."""
    return describe_file(base / WEIGHTS_FILE)


class AdapterWeights:
    """The registry's ``model`` part of a fine-tune: the adapters' tensors only."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {name: param.detach() for name, param in adapter_state_dict(self.model).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        params = adapter_state_dict(self.model)
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise AvaCheckpointError(
                f"the checkpoint's adapters do not match finetune.lora (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); resume with the finetune section it was trained with")
        for name, param in params.items():
            param.copy_(state[name])
