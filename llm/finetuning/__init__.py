"""Finetuning on top of the pretraining stack: text, classification and instruction tasks.

Command: `llm finetune task=<text|classify|instruct> init=<checkpoint | Hugging Face folder>`.
LoRA adapters are a model concern (:mod:`llm.model.lora`); the starting weights come from
:mod:`llm.initial_weights`.
"""
