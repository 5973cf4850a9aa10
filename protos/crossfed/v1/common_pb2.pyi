from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ModalityConfig(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_CONFIG_UNSPECIFIED: _ClassVar[ModalityConfig]
    MODALITY_CONFIG_BOTH: _ClassVar[ModalityConfig]
    MODALITY_CONFIG_TEXT_ONLY: _ClassVar[ModalityConfig]
    MODALITY_CONFIG_IMAGE_ONLY: _ClassVar[ModalityConfig]
MODALITY_CONFIG_UNSPECIFIED: ModalityConfig
MODALITY_CONFIG_BOTH: ModalityConfig
MODALITY_CONFIG_TEXT_ONLY: ModalityConfig
MODALITY_CONFIG_IMAGE_ONLY: ModalityConfig

class TensorChunk(_message.Message):
    __slots__ = ("index", "total", "data", "payload_sha256", "payload_size", "round")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    index: int
    total: int
    data: bytes
    payload_sha256: bytes
    payload_size: int
    round: int
    def __init__(self, index: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ..., payload_sha256: _Optional[bytes] = ..., payload_size: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class TensorPayload(_message.Message):
    __slots__ = ("safetensors", "payload_sha256")
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    payload_sha256: bytes
    def __init__(self, safetensors: _Optional[bytes] = ..., payload_sha256: _Optional[bytes] = ...) -> None: ...

class EncoderInfo(_message.Message):
    __slots__ = ("spec", "identity", "image_size")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    spec: str
    identity: str
    image_size: int
    def __init__(self, spec: _Optional[str] = ..., identity: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...
