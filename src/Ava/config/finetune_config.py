"""The ``finetune`` section: LoRA / QLoRA adapters trained over a frozen base model.

Guide: ``docs/finetuning.md``. The adapters live in :mod:`Ava.layers.lora`; the trainer loads
the base, quantizes it when ``base_quant`` asks, puts the adapters on and trains only them
(:mod:`Ava.training.finetune`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import AvaSection

LoRATarget = Literal["attention", "mlp", "experts", "router"]


class LoRAConfig(AvaSection):
    """The adapters: rank, scale, dropout and which weights carry them."""

    rank: int = Field(8, ge=1, le=1024, description="r, the adapters' inner width.")
    alpha: float = Field(16.0, gt=0.0, description="alpha: the adapter's output is scaled by alpha / rank.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the adapters' input (attention and mlp targets; expert and router adapters "
        "are weight deltas, as PEFT's target_parameters, and take none).",
    )
    targets: list[LoRATarget] = Field(
        ["attention", "mlp", "experts"], min_length=1,
        description="attention (q/k/v/o projections), mlp (dense and shared-expert projections), experts "
        "(each routed expert's 3-D weights), router (the router's weight).",
    )

    @model_validator(mode="after")
    def _dropout_on_linears(self) -> "LoRAConfig":
        if self.dropout > 0 and not {"attention", "mlp"} & set(self.targets):
            raise ValueError("dropout applies to the attention and mlp adapters only; add one of them to "
                             "targets or set dropout: 0")
        return self


class FinetuneConfig(AvaSection):
    """Fine-tune a trained model with LoRA adapters (QLoRA with a quantized base)."""

    base: str = Field(
        ..., description="The base model: an Ava run folder, checkpoint folder or model folder, or a Hugging "
        "Face folder (config.json + safetensors). Its architecture and tokenizer are used; its weights stay frozen.",
    )
    base_quant: Literal["none", "int8", "int4"] = Field(
        "none", description="Quantize the frozen base (QLoRA: int4 group-wise, or int8 per row); none = as saved."
    )
    base_group_size: Literal[32, 64, 128] = Field(64, description="base_quant int4: weights per scale.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="The adapters.")
