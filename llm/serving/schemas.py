"""The OpenAI API's request shapes that ``llm serve`` reads (pydantic), checked as OpenAI checks
them: unknown fields are ignored, out-of-range values are a 400 naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI caps them


class _Request(BaseModel):
    """What both endpoints share; unknown fields (``frequency_penalty``, ``user``, ...) pass."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: the legacy text completion (with ``echo`` and ``logprobs``,
    which evaluation harnesses score with)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text (a list of parts: its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): what lm-evaluation-harness's remote tokenizer sends."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


MAX_INSPECT_TOKENS = 256  # positions the next-token view and the lens show at most
MAX_ATTENTION_TOKENS = 64  # attention is T x T per head: fewer


class InspectRequest(BaseModel):
    """``POST /inspect`` (this server's own, not OpenAI's): the page's inspect view of a
    conversation's last exchange (``messages``, its last one the reply), or of a ``prompt``
    text as it is."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = None
    top_k: int = Field(5, ge=1, le=MAX_LOGPROBS)
    last: int = Field(64, ge=1, le=MAX_INSPECT_TOKENS)
    attention_last: int = Field(32, ge=0, le=MAX_ATTENTION_TOKENS)
