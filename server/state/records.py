"""Plain records the state store keeps: run, clients, round attempts, uploads, events."""

from __future__ import annotations

from dataclasses import dataclass, field

# Run states (admin.proto GetStatusResponse.run_state).
RUN_IDLE = "idle"
RUN_RUNNING = "running"
RUN_PAUSED = "paused"
RUN_STOPPED = "stopped"
RUN_COMPLETED = "completed"
RUN_FAILED = "failed"
TERMINAL_RUN_STATES = frozenset({RUN_STOPPED, RUN_COMPLETED, RUN_FAILED})

# Round-attempt states (admin.proto RoundInfo.state).
ROUND_OPEN = "open"
ROUND_AGGREGATING = "aggregating"
ROUND_COMMITTED = "committed"
ROUND_FAILED = "failed"

# Client states (admin.proto ClientInfo.state).
CLIENT_REGISTERED = "registered"
CLIENT_SELECTED = "selected"
CLIENT_UPLOADED = "uploaded"
CLIENT_OFFLINE = "offline"
CLIENT_REMOVED = "removed"


@dataclass
class RunRecord:
    """The one federated run this state directory holds."""

    run_id: str
    state: str
    total_rounds: int
    last_committed_round: int = 0
    created_unix_s: float = 0.0
    message: str = ""
    epsilon_spent: float = 0.0


@dataclass
class ClientRecord:
    """A registered client: what it holds (modality, sample counts) and how it is doing."""

    client_id: str
    modality: int
    num_samples: int
    num_paired: int = 0
    num_text_only: int = 0
    num_image_only: int = 0
    state: str = CLIENT_REGISTERED
    registered_unix_s: float = 0.0
    last_seen_unix_s: float = 0.0
    last_round: int = 0
    rounds_completed: int = 0
    daemon_version: str = ""


@dataclass
class RoundRecord:
    """One attempt at a round. Round r trains from the global model of round r-1; a failed
    or interrupted attempt is retried as attempt+1 of the same round (same input model)."""

    round: int
    attempt: int
    state: str
    started_unix_s: float
    deadline_unix_s: float
    selected: list[str] = field(default_factory=list)
    ended_unix_s: float = 0.0
    received: int = 0
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    counts_as_retry: bool = True


@dataclass
class UploadRecord:
    """Metadata of one accepted upload (the tensors live only in the running sum)."""

    upload_id: str
    client_id: str
    round: int
    attempt: int
    num_samples: int
    received_unix_s: float
    payload_sha256: str
    module_samples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EventRecord:
    """One entry of the monotone event log (Admin.StreamEvents)."""

    event_id: int
    time_unix_s: float
    kind: str
    round: int = 0
    client_id: str = ""
    message: str = ""
    values: dict[str, float] = field(default_factory=dict)
