from crossfed.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("run_id", "run_state", "current_round", "total_rounds", "last_committed_round", "clients_by_state", "epsilon_spent", "epsilon_budget", "last_metrics", "server_version", "uptime_s", "strategy", "strategy_params", "central_dp")
    class ClientsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class StrategyParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_DP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run_state: str
    current_round: int
    total_rounds: int
    last_committed_round: int
    clients_by_state: _containers.ScalarMap[str, int]
    epsilon_spent: float
    epsilon_budget: float
    last_metrics: _common_pb2.Metrics
    server_version: str
    uptime_s: float
    strategy: str
    strategy_params: _containers.ScalarMap[str, float]
    central_dp: bool
    def __init__(self, run_id: _Optional[str] = ..., run_state: _Optional[str] = ..., current_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., last_committed_round: _Optional[int] = ..., clients_by_state: _Optional[_Mapping[str, int]] = ..., epsilon_spent: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., last_metrics: _Optional[_Union[_common_pb2.Metrics, _Mapping]] = ..., server_version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., strategy: _Optional[str] = ..., strategy_params: _Optional[_Mapping[str, float]] = ..., central_dp: _Optional[bool] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("client_id", "modality", "num_samples", "state", "last_seen_unix_s", "last_round", "rounds_completed", "num_paired", "num_text_only", "num_image_only")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    NUM_PAIRED_FIELD_NUMBER: _ClassVar[int]
    NUM_TEXT_ONLY_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    modality: _common_pb2.ModalityConfig
    num_samples: int
    state: str
    last_seen_unix_s: float
    last_round: int
    rounds_completed: int
    num_paired: int
    num_text_only: int
    num_image_only: int
    def __init__(self, client_id: _Optional[str] = ..., modality: _Optional[_Union[_common_pb2.ModalityConfig, str]] = ..., num_samples: _Optional[int] = ..., state: _Optional[str] = ..., last_seen_unix_s: _Optional[float] = ..., last_round: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., num_paired: _Optional[int] = ..., num_text_only: _Optional[int] = ..., num_image_only: _Optional[int] = ...) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClientsResponse(_message.Message):
    __slots__ = ("clients",)
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientInfo]
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientInfo, _Mapping]]] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "started_unix_s", "ended_unix_s", "selected", "received", "num_samples", "metrics", "message", "attempt")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    started_unix_s: float
    ended_unix_s: float
    selected: int
    received: int
    num_samples: int
    metrics: _common_pb2.Metrics
    message: str
    attempt: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., started_unix_s: _Optional[float] = ..., ended_unix_s: _Optional[float] = ..., selected: _Optional[int] = ..., received: _Optional[int] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Union[_common_pb2.Metrics, _Mapping]] = ..., message: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("rounds", "min_clients", "fraction", "round_deadline_s")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    min_clients: int
    fraction: float
    round_deadline_s: float
    def __init__(self, rounds: _Optional[int] = ..., min_clients: _Optional[int] = ..., fraction: _Optional[float] = ..., round_deadline_s: _Optional[float] = ...) -> None: ...

class RunControlRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RunControlResponse(_message.Message):
    __slots__ = ("run_state", "message")
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    run_state: str
    message: str
    def __init__(self, run_state: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class UpdateConfigRequest(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UpdateConfigResponse(_message.Message):
    __slots__ = ("applied",)
    class AppliedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: _containers.ScalarMap[str, str]
    def __init__(self, applied: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class RemoveClientRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class RemoveClientResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("ttl_s", "client_id")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ttl_s: float
    client_id: str
    def __init__(self, ttl_s: _Optional[float] = ..., client_id: _Optional[str] = ...) -> None: ...

class CreateEnrollmentTokenResponse(_message.Message):
    __slots__ = ("token", "expires_unix_s")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_unix_s: float
    def __init__(self, token: _Optional[str] = ..., expires_unix_s: _Optional[float] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("after_event_id", "follow")
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    after_event_id: int
    follow: bool
    def __init__(self, after_event_id: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "time_unix_s", "kind", "round", "client_id", "message", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    time_unix_s: float
    kind: str
    round: int
    client_id: str
    message: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, event_id: _Optional[int] = ..., time_unix_s: _Optional[float] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[str] = ..., message: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...
