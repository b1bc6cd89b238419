from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Representation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPRESENTATION_UNSPECIFIED: _ClassVar[Representation]
    REPRESENTATION_LAST_LAYER: _ClassVar[Representation]
    REPRESENTATION_TARGET: _ClassVar[Representation]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_NONE: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BINARY: _ClassVar[DType]
    DTYPE_UBINARY: _ClassVar[DType]

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_AUDIO: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
REPRESENTATION_UNSPECIFIED: Representation
REPRESENTATION_LAST_LAYER: Representation
REPRESENTATION_TARGET: Representation
POOLING_UNSPECIFIED: Pooling
POOLING_NONE: Pooling
POOLING_MEAN: Pooling
POOLING_CLS: Pooling
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BINARY: DType
DTYPE_UBINARY: DType
MODALITY_UNSPECIFIED: Modality
MODALITY_AUDIO: Modality
MODALITY_IMAGE: Modality
MODALITY_TEXT: Modality

class EmbedRequest(_message.Message):
    __slots__ = ("model", "inputs", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    options: EmbedOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., options: _Optional[_Union[EmbedOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("audio", "pcm", "image", "text")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    audio: bytes
    pcm: Pcm
    image: bytes
    text: str
    def __init__(self, audio: _Optional[bytes] = ..., pcm: _Optional[_Union[Pcm, _Mapping]] = ..., image: _Optional[bytes] = ..., text: _Optional[str] = ...) -> None: ...

class Pcm(_message.Message):
    __slots__ = ("data", "encoding", "sample_rate", "channels")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[Pcm.Encoding]
        ENCODING_FLOAT32: _ClassVar[Pcm.Encoding]
        ENCODING_INT16: _ClassVar[Pcm.Encoding]
    ENCODING_UNSPECIFIED: Pcm.Encoding
    ENCODING_FLOAT32: Pcm.Encoding
    ENCODING_INT16: Pcm.Encoding
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    encoding: Pcm.Encoding
    sample_rate: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., encoding: _Optional[_Union[Pcm.Encoding, str]] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class EmbedOptions(_message.Message):
    __slots__ = ("representation", "pooling", "normalize", "dtype", "truncate", "chunking")
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    representation: Representation
    pooling: Pooling
    normalize: bool
    dtype: DType
    truncate: bool
    chunking: Chunking
    def __init__(self, representation: _Optional[_Union[Representation, str]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., normalize: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ..., truncate: _Optional[bool] = ..., chunking: _Optional[_Union[Chunking, _Mapping]] = ...) -> None: ...

class Chunking(_message.Message):
    __slots__ = ("enabled", "window", "overlap", "windows")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    window: float
    overlap: float
    windows: bool
    def __init__(self, enabled: _Optional[bool] = ..., window: _Optional[float] = ..., overlap: _Optional[float] = ..., windows: _Optional[bool] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("tensor", "positions", "truncated", "windows")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    positions: int
    truncated: bool
    windows: _containers.RepeatedCompositeFieldContainer[Window]
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[int] = ..., truncated: _Optional[bool] = ..., windows: _Optional[_Iterable[_Union[Window, _Mapping]]] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("start", "end", "positions", "kept_start", "kept_end", "tensor")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    KEPT_START_FIELD_NUMBER: _ClassVar[int]
    KEPT_END_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    start: float
    end: float
    positions: int
    kept_start: int
    kept_end: int
    tensor: Tensor
    def __init__(self, start: _Optional[float] = ..., end: _Optional[float] = ..., positions: _Optional[int] = ..., kept_start: _Optional[int] = ..., kept_end: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("inputs", "positions", "tokens", "audio_frames", "audio_seconds", "images")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    inputs: int
    positions: int
    tokens: int
    audio_frames: int
    audio_seconds: float
    images: int
    def __init__(self, inputs: _Optional[int] = ..., positions: _Optional[int] = ..., tokens: _Optional[int] = ..., audio_frames: _Optional[int] = ..., audio_seconds: _Optional[float] = ..., images: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("preprocess_ms", "queue_ms", "inference_ms", "total_ms")
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, preprocess_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "input_index")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    input_index: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., input_index: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "usage", "timings", "request_id", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    usage: Usage
    timings: Timings
    request_id: str
    error: Error
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "modality", "hidden_size", "num_layers", "precision", "representations", "execution_provider", "ready", "max_tokens", "max_audio_seconds", "image_size", "sample_rate", "file", "metadata_json", "chunk_window", "chunk_overlap", "max_chunked_audio_seconds", "max_chunked_tokens", "file_sha256", "loaded_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATIONS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CHUNK_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKED_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    modality: Modality
    hidden_size: int
    num_layers: int
    precision: str
    representations: _containers.RepeatedScalarFieldContainer[Representation]
    execution_provider: str
    ready: bool
    max_tokens: int
    max_audio_seconds: float
    image_size: int
    sample_rate: int
    file: str
    metadata_json: str
    chunk_window: float
    chunk_overlap: float
    max_chunked_audio_seconds: float
    max_chunked_tokens: int
    file_sha256: str
    loaded_at: float
    def __init__(self, name: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., precision: _Optional[str] = ..., representations: _Optional[_Iterable[_Union[Representation, str]]] = ..., execution_provider: _Optional[str] = ..., ready: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., max_audio_seconds: _Optional[float] = ..., image_size: _Optional[int] = ..., sample_rate: _Optional[int] = ..., file: _Optional[str] = ..., metadata_json: _Optional[str] = ..., chunk_window: _Optional[float] = ..., chunk_overlap: _Optional[float] = ..., max_chunked_audio_seconds: _Optional[float] = ..., max_chunked_tokens: _Optional[int] = ..., file_sha256: _Optional[str] = ..., loaded_at: _Optional[float] = ...) -> None: ...
