"""Every request and response of the API, Ollama's and OpenAI's, error bodies included, in one module, as Ollama
keeps them in `api/types.go` and `openai/openai.go`.

Requests ignore unknown fields (Go's encoding/json does) but reject wrong types (strict mode: a string
is not a bool). Responses are dumped without None fields, as Go's `omitempty` leaves them out.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

# --------------------------------------------------------------------------- shared pieces


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, by_alias=True)


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    index: int | None = None
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    # The Python client drops falsy keys, so an empty content arrives as no key at all.
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


Think = bool | Literal["low", "medium", "high", "max"]
KeepAlive = float | int | str
Format = Literal["", "json"] | dict[str, Any]

# --------------------------------------------------------------------------- /api/generate, /api/chat


class GenerationRequest(Request):
    """What /api/generate and /api/chat both take."""

    model: str = ""
    stream: bool | None = None
    format: Format | None = None
    keep_alive: KeepAlive | None = None
    options: dict[str, Any] | None = None
    think: Think | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class GenerateRequest(GenerationRequest):
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class TokenLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TokenLogprob):
    """One generated token's log probability (under the model's own distribution) and its top alternatives."""

    top_logprobs: list[TokenLogprob] | None = None


class Metrics(Response):
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateResponse(Metrics):
    model: str
    created_at: str
    response: str = ""  # ollama-python 0.6.0/0.6.1 require it on every chunk
    thinking: str | None = None
    done: bool
    done_reason: str | None = None
    context: list[int] | None = None
    logprobs: list[Logprob] | None = None


class ChatMessageOut(Response):
    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatResponse(Metrics):
    model: str
    created_at: str
    message: ChatMessageOut
    done: bool
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None


# --------------------------------------------------------------------------- model management


class CreateRequest(Request):
    model: str = Field("", validation_alias=AliasChoices("model", "name"))
    stream: bool | None = None
    quantize: str | None = Field(None, validation_alias=AliasChoices("quantize", "quantization"))
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None


class ProgressResponse(Response):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class ModelRequest(Request):
    """/api/show and /api/delete: `model`, or the older `name`."""

    model: str = Field("", validation_alias=AliasChoices("model", "name"))
    verbose: bool = False


class CopyRequest(Request):
    source: str = ""
    destination: str = ""


class PullRequest(Request):
    model: str = Field("", validation_alias=AliasChoices("model", "name"))
    insecure: bool = False
    stream: bool | None = None


class ModelDetails(Response):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListModel(Response):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ListResponse(Response):
    models: list[ListModel]


class ShowResponse(Response):
    license: str | None = None
    modelfile: str
    parameters: str | None = None
    template: str | None = None
    system: str | None = None
    details: ModelDetails
    messages: list[Message] | None = None
    model_info: dict[str, Any]  # ollama-python requires the key
    capabilities: list[str]
    modified_at: str


class ProcessModel(Response):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int = 0
    context_length: int


class ProcessResponse(Response):
    models: list[ProcessModel]


class VersionResponse(Response):
    version: str


# --------------------------------------------------------------------------- embeddings


class EmbedRequest(Request):
    model: str = ""
    input: str | list[str] = ""
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None
    dimensions: int | None = None


class EmbedResponse(Response):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsRequest(Request):
    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None


class EmbeddingsResponse(Response):
    embedding: list[float]


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIRequest(BaseModel):
    # OpenAI clients send many fields Ollama ignores (n, user, logit_bias...); keep lax typing here as
    # Ollama's openai middleware does (numbers may arrive as ints or floats).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class OpenAIMessage(OpenAIRequest):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None


class OpenAIGenerationRequest(OpenAIRequest):
    """What /v1/chat/completions and /v1/completions both take (the sampling fields become Ollama's options)."""

    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class ChatCompletionRequest(OpenAIGenerationRequest):
    messages: list[OpenAIMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(OpenAIGenerationRequest):
    prompt: str = ""
    suffix: str | None = None
    logprobs: int | None = None
    """The legacy API's form: how many alternatives to list for each token (0 lists none)."""


class OpenAIEmbeddingRequest(OpenAIRequest):
    model: str = ""
    input: str | list[str] = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# --------------------------------------------------------------------------- errors


class ErrorResponse(Response):
    """Ollama's error body, and a stream's last line when it fails part-way."""

    error: str


class OpenAIResponse(BaseModel):
    """OpenAI's bodies keep their null fields (`"finish_reason": null`); those named in `omit_none` are left out
    when None, as OpenAI leaves them out."""

    model_config = ConfigDict(extra="forbid")
    omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self.omit_none)}

    def wire(self) -> dict[str, Any]:
        return self.model_dump()


class OpenAIErrorDetail(OpenAIResponse):
    message: str
    type: str = "api_error"
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(OpenAIResponse):
    error: OpenAIErrorDetail


# --------------------------------------------------------------------------- OpenAI-compatible responses


class OpenAIModel(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class Usage(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAITopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None


class OpenAILogprob(OpenAITopLogprob):
    top_logprobs: list[OpenAITopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIResponse):
    content: list[OpenAILogprob]


class OpenAIFunctionCall(OpenAIResponse):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class OpenAIToolCall(OpenAIResponse):
    id: str
    index: int
    type: Literal["function"] = "function"
    function: OpenAIFunctionCall


class ChatCompletionMessage(OpenAIResponse):
    omit_none = frozenset({"reasoning", "tool_calls"})
    role: str = "assistant"
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None


class OpenAICompletionHead(OpenAIResponse):
    """What every chat completion, chunk and (legacy) completion has; a stream's chunks carry no usage but the
    last (with `stream_options.include_usage`)."""

    omit_none = frozenset({"usage"})
    id: str
    created: int
    model: str
    system_fingerprint: str = "fp_ollama"
    usage: Usage | None = None


class OpenAIChoice(OpenAIResponse):
    """One choice of an answer; tunesmith always answers one (`n` is ignored, as by Ollama)."""

    index: int = 0
    finish_reason: str | None = None
    """None until the last chunk of a stream."""


class ChatChoice(OpenAIChoice):
    """A chat answer's choice: its log probabilities only when they were asked for."""

    omit_none = frozenset({"logprobs"})
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChoice(ChatChoice):
    message: ChatCompletionMessage


class ChatCompletion(OpenAICompletionHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]


class ChunkChoice(ChatChoice):
    delta: ChatCompletionMessage


class ChatCompletionChunk(OpenAICompletionHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


class LegacyLogprobs(OpenAIResponse):
    """/v1/completions' older shape: parallel lists of tokens, their log probabilities, the alternatives as
    {token: logprob} maps, and each token's character offset in the text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(OpenAIChoice):
    text: str
    logprobs: LegacyLogprobs | None = None


class Completion(OpenAICompletionHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class OpenAIEmbedding(OpenAIResponse):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    """The vector, or its little-endian float32 bytes in base64 (`encoding_format: base64`)."""
    index: int


class EmbeddingUsage(OpenAIResponse):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: EmbeddingUsage
