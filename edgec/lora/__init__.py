"""LoRA adapters: PEFT reading/validation (``peft_adapter``), diffusers-format files
(``diffusers_lora``), swappable binding (``binding``), and PEFT's (or diffusers') own merged
model as a PyTorch reference (``reference``)."""

from edgec.lora.peft_adapter import (
    NO_ADAPTER,
    LoraAdapter,
    LoraModule,
    parse_lora_option,
    read_adapter,
    resolve_targets,
    write_peft_adapter,
)

__all__ = ["LoraAdapter", "LoraModule", "read_adapter", "write_peft_adapter",
           "parse_lora_option", "resolve_targets", "NO_ADAPTER"]
