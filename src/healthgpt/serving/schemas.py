"""Request bodies of the OpenAI-compatible API (the parts this server implements) and OpenAI-style errors."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of newer OpenAI clients that change nothing here


class ImageURL(_Lenient):
    url: str


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """`POST /v1/chat/completions`. `top_k`, `repetition_penalty`, `min_tokens` and `ignore_eos` extend the OpenAI
    schema (send them with the client's `extra_body`); an absent temperature means greedy decoding, as the published
    model is run."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no stop before this many tokens
    ignore_eos: bool = False  # vLLM's extension: generate to the token budget
    n: int = 1
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, reason) for the first OpenAI option this server cannot honour."""
        if self.n != 1:
            return "n", "only n=1 is supported; send separate requests"
        if self.stop:
            return "stop", "stop sequences are not supported; the model stops at its own end tokens"
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty", "use repetition_penalty (an extension) instead of frequency/presence penalties"
        if self.logprobs:
            return "logprobs", "log-probabilities are not returned"
        if self.tools:
            return "tools", "tool calls are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only text responses are supported"
        return None
