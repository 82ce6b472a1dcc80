"""LoRA adapters as a PEFT folder for the Hugging Face export of their base.

``ava export RUN --format peft --out DIR`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` so that::

    base = AutoModelForCausalLM.from_pretrained(EXPORT)   # ava export BASE --format hf --out EXPORT
    model = PeftModel.from_pretrained(base, DIR)

gives the fine-tune's logits. Ava's module names are the HF export's (``model.`` + Ava name), so
the mapping is a rename, plus PEFT's layout for 3-D expert weights (``target_parameters``,
peft ≥ 0.17): per fused parameter of shape (E, out, in), ``lora_A`` is (E·r, in) with the experts
in consecutive blocks of r rows and ``lora_B`` is (out, r·E) with the experts interleaved
(column ``j·E + e`` is expert e's column j). When two parameters of one module are targeted,
PEFT nests its wrappers in the module's parameter order: ``gate_up_proj``'s adapter sits under
``experts.base_layer``, ``down_proj``'s under ``experts``.

Adapters on dense MLP layers (the ``mlp`` target) are refused: PEFT with transformers 5 maps the
target names ``gate_proj`` / ``up_proj`` / ``down_proj`` of MoE architectures onto the fused
experts (the names those had in transformers 4), so it would load them onto the wrong weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config.checkpoint_layout import WEIGHTS_FILE, resolve_checkpoint, set_default_mode, verify_files
from ..errors import AvaCheckpointError, AvaConfigError
from ..layers.lora import LORA_FILE, read_lora
from ..utils.output_paths import check_output_dir
from .huggingface import describe_written

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "export_peft", "peft_state_dict"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model."
_EXPERT_KEYS = {"gate_up": ("base_layer.", "mlp.experts.gate_up_proj"), "down": ("", "mlp.experts.down_proj")}


def peft_state_dict(adapters: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Ava's adapter tensors under PEFT's keys and layout.

    Args:
        adapters: a fine-tune checkpoint's ``model.safetensors`` (``...q_proj.lora_A``,
            ``...mlp.gate.parametrizations.weight.0.lora_A``, ``...mlp.experts.gate_up_lora_A``, ...).

    Returns:
        ``(tensors, target_modules, target_parameters)`` for ``adapter_model.safetensors`` and
        ``adapter_config.json``.
    """
    out: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    parameters: set[str] = set()
    for name, tensor in adapters.items():
        owner, _, leaf = name.rpartition(".")
        if ".parametrizations.weight." in name:  # the router: mlp.gate.parametrizations.weight.0.lora_A
            module = name.split(".parametrizations.")[0]
            out[f"{_PREFIX}{module}.{leaf}.weight"] = tensor
            parameters.add(module.split(".", 2)[2] + ".weight")
        elif leaf.startswith(("gate_up_lora_", "down_lora_")):  # routed experts: (E, r, in) / (E, out, r)
            which, _, ab = leaf.rpartition("_lora_")
            nest, target = _EXPERT_KEYS[which]
            flat = tensor.reshape(-1, tensor.shape[-1]) if ab == "A" else tensor.permute(1, 2, 0).reshape(tensor.shape[1], -1)
            out[f"{_PREFIX}{owner}.{nest}lora_{ab}.weight"] = flat.contiguous()
            parameters.add(target)
        elif leaf in ("lora_A", "lora_B"):  # a linear: layers.0.self_attn.q_proj.lora_A
            if ".mlp." in name:
                raise AvaConfigError(
                    f"{owner}: PEFT cannot load adapters on a MoE model's dense MLP layers: with transformers 5 it "
                    "reads gate_proj / up_proj / down_proj targets as the experts' pre-fusion names and moves them "
                    "onto the fused experts; fine-tune without `mlp` in finetune.lora.targets, or merge "
                    "(`ava merge-lora`) and export --format hf")
            out[f"{_PREFIX}{owner}.{leaf}.weight"] = tensor
            modules.add(owner.rpartition(".")[2])
        else:
            raise AvaCheckpointError(f"unexpected adapter tensor {name!r}; the checkpoint is not an Ava LoRA fine-tune")
    return {k: v.contiguous() for k, v in out.items()}, sorted(modules), sorted(parameters)


def export_peft(path: str | Path, out: str | Path, verify: bool = True) -> Path:
    """Write a fine-tune's adapters as a PEFT LoRA folder.

    Args:
        path: a fine-tune's run or checkpoint folder (its checkpoint holds ``lora.json``).
        out: the folder to write.
        verify: check the checkpoint's files against its manifest first.

    Returns:
        The output folder.

    Raises:
        AvaConfigError: the checkpoint is not a LoRA fine-tune.
        AvaCheckpointError: missing or damaged files.
        AvaOutputError: ``out`` cannot be written (checked first).
    """
    from safetensors.torch import load_file, save_file

    folder = check_output_dir(out, "out")
    checkpoint = resolve_checkpoint(path)
    lora = read_lora(checkpoint)
    if lora is None:
        raise AvaConfigError(f"{checkpoint} has no {LORA_FILE}: --format peft writes the adapters of a LoRA "
                             "fine-tune (a run with a finetune section); export a full model with --format hf")
    if verify:
        verify_files(checkpoint, (WEIGHTS_FILE, LORA_FILE))
    tensors, modules, parameters = peft_state_dict(load_file(str(checkpoint / WEIGHTS_FILE)))
    dropout = lora["dropout"]
    if parameters and dropout > 0:  # PEFT's parameter adapters take no dropout; inference has none anyway
        logger.info("lora_dropout written as 0 (was %g): PEFT refuses dropout with target_parameters, and "
                    "dropout does nothing at inference", dropout)
        dropout = 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": dropout, "bias": "none",
        "target_modules": modules, "target_parameters": parameters or None, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    set_default_mode(folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if lora["base_quant"] != "none":
        logger.warning("these adapters were trained over the base quantized to %s; on the full-precision HF "
                       "export of %s the outputs differ by that quantization's error", lora["base_quant"],
                       lora["base"])
    logger.info("exported the LoRA adapters of %s (r=%d, %d tensors) to %s (%s); base: the HF export of %s "
                "(`ava export %s --format hf --out EXPORT`)", checkpoint, lora["rank"], len(tensors), folder,
                describe_written(folder, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]), lora["base"], lora["base"])
    return folder
