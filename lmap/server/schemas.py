"""Request bodies of the OpenAI-compatible endpoints, validated before anything reaches the engine.

Validation is strict about types (``"max_tokens": "ten"`` is a 400 naming ``max_tokens``, a string is
never coerced to a number) and lenient about unknown fields (clients send vendor extras; they are
ignored). Ranges that depend on the loaded model (context length, slot count) are checked in
:mod:`lmap.server.app`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "StreamOptions",
    "TokenizeRequest",
    "ValidationError",
    "describe",
]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Parameters shared by /v1/completions and /v1/chat/completions (llama-server's defaults)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=0.8, ge=0.0, le=100.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    typical_p: float = Field(default=1.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    penalty_last_n: int = Field(default=64, ge=-1)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    grammar: str | None = None
    response_format: dict[str, Any] | None = None
    cache_prompt: bool = True
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or {}:
            try:
                if int(k) < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"keys must be token ids (integers >= 0), got {k!r}") from None
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


def describe(e: ValidationError) -> tuple[str, str | None]:
    """One line naming the first invalid field and what was expected, and that field's name."""
    err = e.errors()[0]
    # drop pydantic's union-member tags ("str", "list[int]") from the location
    loc = [str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"missing required field '{param}'", param
    if "input" in err and err.get("type") != "missing":
        shown = repr(err["input"])
        msg = f"{msg} (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return (f"{param}: {msg}" if param else msg), param


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after"}
