"""Finetuning on top of the pretraining stack: text, classification and instruction tasks, LoRA.

Entry point: `python -m llm.finetune task=<text|classify|instruct> init=<ckpt | HF GPT-2 dir>`.
"""

from llm.finetuning.lora import LoRALinear, apply_lora, lora_state_dict_merged, merge_lora

__all__ = ["LoRALinear", "apply_lora", "lora_state_dict_merged", "merge_lora"]
