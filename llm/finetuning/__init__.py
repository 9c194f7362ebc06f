"""Finetuning on top of the pretraining stack: text, classification and instruction tasks, LoRA.

Command: `llm finetune task=<text|classify|instruct> init=<checkpoint | Hugging Face folder>`.
"""

from llm.finetuning.lora import LoRALinear, apply_lora, lora_state_dict_merged, merge_lora

__all__ = ["LoRALinear", "apply_lora", "lora_state_dict_merged", "merge_lora"]
