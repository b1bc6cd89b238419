"""The HTTP API's JSON bodies as pydantic models: they validate requests and describe both endpoints in /openapi.json.

`/v1/embeddings` follows OpenAI's embeddings API; `/v1/embed` mirrors the gRPC EmbedRequest / EmbedResponse, with
bytes as base64 strings and enums as the lower-case names of `request.EmbedOptions`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# ---- OpenAI-compatible ------------------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields this server has no use for

    model: str = Field("", description="a served model's name (GET /v1/models); empty: the one model serving the "
                                       "first input's modality")
    # validated loosely here so that the route can say which item is wrong, documented as OpenAI's union
    input: Annotated[str | list[Any], WithJsonSchema({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]})] = Field(
        description="a string or a list of strings. Text models embed them as text; audio and image models take "
                    "each as a `data:<type>;base64,<payload>` URI of an encoded file (wav, flac, ogg; png, jpeg, ...). "
                    "Token-id arrays are refused.")
    encoding_format: Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] = Field(
        "float", description="`base64`: each embedding as base64 of little-endian float32. d2v's extension, compact "
                             "vectors as lists of integers: `int8` (round(127 v / max|v|) of the normalised vector), "
                             "`uint8` (int8 + 128), `ubinary` (sign bits packed 8 to a byte, first dimension in "
                             "the high bit) and `binary` (those bytes - 128)")
    dimensions: int | None = Field(None, description="only the model's own hidden size is accepted")
    user: str | None = Field(None, description="accepted and ignored")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(description="text: tokens incl. specials; audio and image: output positions")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingsUsage


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = None
    code: str = Field(description="the gRPC status name in lower case, e.g. invalid_argument, not_found")
    input_index: int | None = Field(None, description="the bad input, when one input is at fault")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "d2v"
    d2v: dict[str, Any] = Field(description="the model's description, as gRPC DescribeModel gives it")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- native: a JSON mirror of d2v.v1.EmbedRequest / EmbedResponse ---------------------------------------------


class PcmBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="base64 of the samples, interleaved when channels > 1")
    encoding: Literal["float32", "int16"] = Field(description="little-endian float32 in [-1, 1], or int16")
    sample_rate: int = Field(description="Hz; resampled to the model's rate")
    channels: int = 1


class InputBody(BaseModel):
    """Exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    audio: str | None = Field(None, description="base64 (or a data: URI) of an encoded audio file")
    image: str | None = Field(None, description="base64 (or a data: URI) of an encoded image")
    pcm: PcmBody | None = None


class ChunkingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    window: float = Field(0.0, description="audio: seconds; text: tokens per window incl. <s> and </s>; 0: the "
                                           "model's default (ModelInfo chunk_window)")
    overlap: float | None = Field(None, description="audio: seconds (default 1); text: tokens (default 64)")
    windows: bool = Field(False, description="return the per-window breakdown in each embedding's `windows`")


class OptionsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    representation: Literal["last", "target"] = Field("last", description="the last layer, or the data2vec target "
                                                                           "space")
    pooling: Literal["mean", "none", "cls"] = Field("mean", description="none: one vector per valid position")
    normalize: bool = Field(False, description="L2-normalise each output vector")
    dtype: Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"] = Field(
        "float32", description="int8, uint8, binary, ubinary: compact pooled vectors (see the Embedder proto's DType)")
    truncate: bool = Field(False, description="cut over-long inputs instead of failing")
    chunking: ChunkingBody = Field(default_factory=ChunkingBody, description="long audio and text in overlapping "
                                                                              "windows, joined into one embedding")


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    inputs: list[InputBody]
    options: OptionsBody = Field(default_factory=OptionsBody)
    request_id: str = ""
    data_format: Literal["list", "base64"] = Field(
        "list", description="each tensor's data as nested lists of numbers, or base64 of its little-endian bytes "
                            "(C order)")


class TensorBody(BaseModel):
    shape: list[int]
    dtype: Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
    data: list[Any] | str


class WindowBody(BaseModel):
    start: float = Field(description="audio: seconds; text: token position in the whole input")
    end: float
    positions: int
    kept_start: int
    kept_end: int
    tensor: TensorBody


class EmbeddingBody(BaseModel):
    tensor: TensorBody
    positions: int
    truncated: bool
    windows: list[WindowBody] | None = Field(None, description="with options.chunking.windows")


class EmbedResponseBody(BaseModel):
    model: str
    embeddings: list[EmbeddingBody]
    usage: dict[str, int | float]
    timings: dict[str, float]
    request_id: str
