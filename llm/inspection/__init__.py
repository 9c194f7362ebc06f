"""Look inside a language model: what it expects next, what each layer already "knows" (logit
lens), where each head looks, which heads matter (ablation) and where a fact flows (activation
patching).

Each view is one function of a GPT and a tokenizer returning plain JSON-serialisable data
(lists, numbers, strings), for ``llm inspect`` and the web page alike; :mod:`.drawing` turns
them into figures. They read the model only through its public seams
(``GPT.residual_stream``, ``GPT.unembed``, ``GPT.attention_maps``), so every architecture
option and Hugging Face weights work alike.
"""

from llm.inspection.ablation import head_ablation, masked_loss
from llm.inspection.attention import attention
from llm.inspection.lens import logit_lens
from llm.inspection.next_token import next_token
from llm.inspection.patching import activation_patching, logit_diff
from llm.inspection.tokens import encode, point_names, single_token

__all__ = [
    "activation_patching",
    "attention",
    "encode",
    "head_ablation",
    "logit_diff",
    "logit_lens",
    "masked_loss",
    "next_token",
    "point_names",
    "single_token",
]
