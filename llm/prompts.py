"""How a checkpoint wants a conversation turned into text: its prompt template.

A checkpoint records its template (``hparams["template"]``): ``alpaca`` after instruction
finetuning, ``chat`` for the chat template of a Hugging Face tokenizer, None for a base model,
which just continues the text. Every template renders a list of messages
(``{"role": "system" | "user" | "assistant", "content": ...}``) that ends with a user message
into the text the reply should follow; an earlier assistant message renders as the reply plus the
token that ended it, so a conversation's text only ever grows (a chat's KV cache relies on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm.tokenizers import Tokenizer
from llm.tokenizers.base import EOT

TEMPLATES = ("alpaca", "chat")  # and None: continue the text

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
# beginning-of-text names that chat templates expect as `bos_token` (tokenizer.json keeps no name)
_BOS_NAMES = ("<|begin_of_text|>", "<s>")

Message = dict[str, Any]


def check_template(
    template: str | None, key: str = "template", tokenizer: Tokenizer | None = None
) -> str | None:
    """``template`` if it is one we render (``none`` is None, as `llm chat` spells it), else an
    error naming the choices; given the tokenizer, ``chat`` needs one with a chat template
    (refused now, not at the first prompt)."""
    if template == "none":
        return None
    if template is not None and template not in TEMPLATES:
        raise ValueError(
            f"{key}={template!r} is not a prompt template; use one of {list(TEMPLATES)} or "
            "null / none (a base model: continue the text)"
        )
    if template == "chat" and tokenizer is not None:
        chat_template_source(tokenizer)
    return template


def format_prompt(record: dict[str, Any]) -> str:
    """Alpaca prompt up to and including '### Response:\\n'; no Input section when empty."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


def render(template: str | None, messages: Sequence[Message], tokenizer: Tokenizer) -> str:
    """The text of ``messages`` (ending with a user message) that the model's reply follows.

    None: the messages' texts one after the other (a reply that ended on <|endoftext|> keeps
    it). alpaca: each exchange is one Alpaca record (prompt, response, <|endoftext|>), as
    instruction finetuning trained on; earlier exchanges come first, like earlier documents, and a
    system message has no place. chat: the tokenizer's own chat template.
    """
    check_template(template)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a conversation to render must end with a user message")
    if template == "chat":
        return render_chat_template(tokenizer, messages)
    if template == "alpaca" and any(m["role"] == "system" for m in messages):
        raise ValueError("the alpaca template has no system message; use template=chat")
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(format_prompt({"instruction": m["content"]}) if template else m["content"])
        elif m["role"] == "assistant":
            ended = template == "alpaca" or m.get("ended", False)
            parts.append(m["content"] + (EOT if ended else ""))
    return "".join(parts)


def render_chat_template(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
) -> str:
    """The tokenizer's Jinja chat template rendered as transformers does (sandboxed, trim_blocks,
    lstrip_blocks, raise_exception and tojson), without transformers or a model download."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = chat_template_source(tokenizer)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    specials = tokenizer.special_tokens
    eos = getattr(tokenizer, "eos_token", None)
    bos = next((t for t in _BOS_NAMES if t in specials), None)
    try:
        return env.from_string(source).render(
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos or "",
            eos_token=eos or "",
        )
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat template refused the conversation: {e}") from e


def chat_template_source(tokenizer: Tokenizer) -> str:
    """The Jinja source of the tokenizer's chat template (the ``default`` one of a named set)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(
            f"template=chat needs a tokenizer with a chat template, but this "
            f"{type(tokenizer).__name__} has none: use template=alpaca or template=none"
        )
    return template
