"""LoRA adapters: PEFT reading/validation (``peft_adapter``), swappable binding (``binding``),
and PEFT's own merged model as a PyTorch reference (``reference``)."""

from edgec.lora.peft_adapter import (
                                     NO_ADAPTER,
                                     LoraAdapter,
                                     LoraModule,
                                     parse_lora_option,
                                     read_adapter,
                                     resolve_targets,
)

__all__ = ["LoraAdapter", "LoraModule", "read_adapter", "parse_lora_option", "resolve_targets",
           "NO_ADAPTER"]
