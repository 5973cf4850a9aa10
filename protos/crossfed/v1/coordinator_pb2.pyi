from crossfed.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_WAIT: _ClassVar[Action]
    ACTION_TRAIN: _ClassVar[Action]
    ACTION_DONE: _ClassVar[Action]
    ACTION_REGISTER: _ClassVar[Action]
    ACTION_CALIBRATE: _ClassVar[Action]
ACTION_UNSPECIFIED: Action
ACTION_WAIT: Action
ACTION_TRAIN: Action
ACTION_DONE: Action
ACTION_REGISTER: Action
ACTION_CALIBRATE: Action

class EnrollRequest(_message.Message):
    __slots__ = ("enrollment_token", "requested_client_id")
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    requested_client_id: str
    def __init__(self, enrollment_token: _Optional[str] = ..., requested_client_id: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("client_id", "client_secret", "server_fingerprint")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    SERVER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_secret: bytes
    server_fingerprint: str
    def __init__(self, client_id: _Optional[str] = ..., client_secret: _Optional[bytes] = ..., server_fingerprint: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("modality", "num_samples", "num_paired", "num_text_only", "num_image_only", "model_config_digest", "daemon_version", "class_names", "label_names", "text_encoder", "image_encoder", "sd_checkpoint_digest")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_PAIRED_FIELD_NUMBER: _ClassVar[int]
    NUM_TEXT_ONLY_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODER_FIELD_NUMBER: _ClassVar[int]
    SD_CHECKPOINT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    modality: _common_pb2.ModalityConfig
    num_samples: int
    num_paired: int
    num_text_only: int
    num_image_only: int
    model_config_digest: str
    daemon_version: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    label_names: _containers.RepeatedScalarFieldContainer[str]
    text_encoder: _common_pb2.EncoderInfo
    image_encoder: _common_pb2.EncoderInfo
    sd_checkpoint_digest: str
    def __init__(self, modality: _Optional[_Union[_common_pb2.ModalityConfig, str]] = ..., num_samples: _Optional[int] = ..., num_paired: _Optional[int] = ..., num_text_only: _Optional[int] = ..., num_image_only: _Optional[int] = ..., model_config_digest: _Optional[str] = ..., daemon_version: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., label_names: _Optional[_Iterable[str]] = ..., text_encoder: _Optional[_Union[_common_pb2.EncoderInfo, _Mapping]] = ..., image_encoder: _Optional[_Union[_common_pb2.EncoderInfo, _Mapping]] = ..., sd_checkpoint_digest: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("client_id", "run_id", "current_round", "model_config_json", "heartbeat_interval_ms", "chunk_size", "class_names", "projection_privacy")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_PRIVACY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    run_id: str
    current_round: int
    model_config_json: str
    heartbeat_interval_ms: int
    chunk_size: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    projection_privacy: ProjectionPrivacy
    def __init__(self, client_id: _Optional[str] = ..., run_id: _Optional[str] = ..., current_round: _Optional[int] = ..., model_config_json: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., chunk_size: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., projection_privacy: _Optional[_Union[ProjectionPrivacy, _Mapping]] = ...) -> None: ...

class ProjectionPrivacy(_message.Message):
    __slots__ = ("required", "noise_multiplier", "clip_norm", "delta", "epsilon_budget")
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    required: bool
    noise_multiplier: float
    clip_norm: float
    delta: float
    epsilon_budget: float
    def __init__(self, required: _Optional[bool] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_budget: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("last_completed_round",)
    LAST_COMPLETED_ROUND_FIELD_NUMBER: _ClassVar[int]
    last_completed_round: int
    def __init__(self, last_completed_round: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("action", "round", "poll_after_ms", "deadline_unix_s", "upload_public_key", "local_epochs", "run_state", "message", "proximal_mu", "logit_adjustment")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    POLL_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    LOGIT_ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    action: Action
    round: int
    poll_after_ms: int
    deadline_unix_s: float
    upload_public_key: bytes
    local_epochs: int
    run_state: str
    message: str
    proximal_mu: float
    logit_adjustment: float
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., round: _Optional[int] = ..., poll_after_ms: _Optional[int] = ..., deadline_unix_s: _Optional[float] = ..., upload_public_key: _Optional[bytes] = ..., local_epochs: _Optional[int] = ..., run_state: _Optional[str] = ..., message: _Optional[str] = ..., proximal_mu: _Optional[float] = ..., logit_adjustment: _Optional[float] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round", "start_chunk")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    START_CHUNK_FIELD_NUMBER: _ClassVar[int]
    round: int
    start_chunk: int
    def __init__(self, round: _Optional[int] = ..., start_chunk: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("round", "client_public_key", "num_samples", "module_samples", "metrics", "payload_size", "payload_sha256", "total_chunks", "encrypted", "upload_id")
    class ModuleSamplesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODULE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_public_key: bytes
    num_samples: int
    module_samples: _containers.ScalarMap[str, int]
    metrics: _common_pb2.Metrics
    payload_size: int
    payload_sha256: bytes
    total_chunks: int
    encrypted: bool
    upload_id: str
    def __init__(self, round: _Optional[int] = ..., client_public_key: _Optional[bytes] = ..., num_samples: _Optional[int] = ..., module_samples: _Optional[_Mapping[str, int]] = ..., metrics: _Optional[_Union[_common_pb2.Metrics, _Mapping]] = ..., payload_size: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., total_chunks: _Optional[int] = ..., encrypted: _Optional[bool] = ..., upload_id: _Optional[str] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: _common_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ProjectionExchangeRequest(_message.Message):
    __slots__ = ("round", "projections", "epsilon_spent", "noise_multiplier", "clip_norm")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    round: int
    projections: _common_pb2.TensorPayload
    epsilon_spent: float
    noise_multiplier: float
    clip_norm: float
    def __init__(self, round: _Optional[int] = ..., projections: _Optional[_Union[_common_pb2.TensorPayload, _Mapping]] = ..., epsilon_spent: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ...) -> None: ...

class ProjectionExchangeResponse(_message.Message):
    __slots__ = ("global_prototypes", "prototypes_round", "epsilon_spent", "epsilon_budget")
    GLOBAL_PROTOTYPES_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPES_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    global_prototypes: _common_pb2.TensorPayload
    prototypes_round: int
    epsilon_spent: float
    epsilon_budget: float
    def __init__(self, global_prototypes: _Optional[_Union[_common_pb2.TensorPayload, _Mapping]] = ..., prototypes_round: _Optional[int] = ..., epsilon_spent: _Optional[float] = ..., epsilon_budget: _Optional[float] = ...) -> None: ...
