"""Request bodies of the OpenAI API, as pydantic models, in the OpenAI field names.

Fields QLM cannot honour are refused with a 400 naming them, never silently dropped:
`n` and `best_of` other than 1, `echo`, `logprobs`, `suffix`, non-zero penalties, tools.
Fields the API defines that change nothing here (e.g. `frequency_penalty: 0`) pass.
`slo_class` is QLM's own extra field (the `x-qlm-slo-class` header wins over it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qlmserve.controller.http.errors import HttpError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    slo_class: str | None = None
    idempotency_key: str | None = None

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise HttpError(400, "field 'n': only n=1 is supported (send one request per completion)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise HttpError(400, f"field '{name}': penalties are not supported (0 or absent only)", name)
        if self.logit_bias:
            raise HttpError(400, "field 'logit_bias' is not supported", "logit_bias")

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4:
            raise HttpError(400, "field 'stop': at most 4 sequences", "stop")
        return [x for x in s if x]


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of not in (None, 1):
            raise HttpError(400, "field 'best_of': only 1 is supported", "best_of")
        if self.echo:
            raise HttpError(400, "field 'echo' is not supported", "echo")
        if self.logprobs is not None:
            raise HttpError(400, "field 'logprobs' is not supported", "logprobs")
        if self.suffix:
            raise HttpError(400, "field 'suffix' is not supported", "suffix")

    def single_prompt(self) -> tuple[str | None, list[int] | None]:
        """(text, token ids): one prompt only, as a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p, None
        if p and all(isinstance(x, int) for x in p):
            return None, list(p)
        if len(p) == 1:
            return (p[0], None) if isinstance(p[0], str) else (None, list(p[0]))
        raise HttpError(400, "field 'prompt': one prompt per request (a string or a list of token ids)", "prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise HttpError(400, "field 'logprobs' is not supported", "logprobs")
        if self.tools:
            raise HttpError(400, "field 'tools': tool calls are not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise HttpError(400, "field 'response_format': only text is supported", "response_format")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first error becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"] if not str(x).startswith(("str", "list[", "int", "function"))]
        field = ".".join(loc) or None
        raise HttpError(400, f"field '{field}': {err['msg']}" if field else err["msg"], field) from None
