"""Server and client configuration: pydantic models plus one loader for file < env < CLI flags.

``load_config(ServerConfig, path)`` reads a YAML or TOML file, overlays environment variables
(``CROSSFED_ROUNDS__MIN_CLIENTS=3``: double underscore descends a level) and then CLI overrides
(``{"rounds.min_clients": 3}``), and validates the result. Every problem becomes one
``ConfigError`` line naming the field, e.g. ``config: rounds.min_clients: Input should be greater
than 0 (got -1) [from env CROSSFED_ROUNDS__MIN_CLIENTS]``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml
from crossfed.common.data.class_list import check_class_names, default_class_names
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.round_instructions import MAX_LOGIT_ADJUSTMENT, MAX_PROXIMAL_MU
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

__all__ = [
    "BuiltinDataConfig",
    "ClientConfig",
    "ClientPrivacyConfig",
    "ClientSDConfig",
    "ConfigError",
    "ManifestDataConfig",
    "MissingModalityConfig",
    "ReconnectConfig",
    "RoundPolicy",
    "ServerConfig",
    "ServerPrivacyConfig",
    "TLSConfig",
    "TrainSection",
    "TransportConfig",
    "load_config",
]

MiB = 1024 * 1024
#: Bytes a chunk message carries besides its data (index, digest, AEAD tag, ids); headroom.
CHUNK_ENVELOPE_BYTES = 64 * 1024
ADDRESS_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")
_SECRET_HINTS = ("token", "secret", "password")


class ConfigError(ValueError):
    """A configuration that cannot be loaded; ``str()`` is one line naming field and problem."""


#: Projection noise multiplier (sigma) and epsilon budget of the defaults: with them a client
#: holding both modalities spends epsilon <= 10 at delta = 1e-5 over the default run (see
#: the privacy sections' noise_multiplier).
DEFAULT_PROJECTION_NOISE_MULTIPLIER = 5.0
DEFAULT_EPSILON_BUDGET = 10.0
#: Default update bound (UpdateBoundConfig.max_norm_ratio).
DEFAULT_UPDATE_NORM_RATIO = 0.5

#: Upper bound of round and client counts: far above any real federation, and small enough
#: for every integer column of the state database (SQLite INTEGER is 64-bit).
MAX_COUNT = 1_000_000


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated,
    and no float may be inf or NaN (``epsilon_budget: .inf`` or ``1e400`` is not a number a
    bound can be checked against)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_address(value: str) -> str:
    match = ADDRESS_RE.match(value)
    if match is None or not 0 <= int(match.group(2)) < 65536:
        raise ValueError(f"expected host:port (port 0-65535), e.g. 127.0.0.1:50051, got {value!r}")
    return value


class TLSConfig(_Section):
    """Transport security. TLS is on unless ``insecure`` is set explicitly (loopback/dev only)."""

    cert_dir: Path = Field(
        default=Path("certs"), description="directory written by `crossfed certs` (CA, certs, keys)"
    )
    mtls: bool = Field(default=False, description="require client certificates as well")
    insecure: bool = Field(default=False, description="plaintext gRPC; only when asked for by flag")
    insecure_off_loopback: bool = Field(
        default=False,
        description="server: allow insecure=true on an address other than loopback (plaintext "
        "and unauthenticated to anyone who can reach it; e.g. inside a container whose port is "
        "published on 127.0.0.1 only)",
    )

    @model_validator(mode="after")
    def _mtls_needs_tls(self) -> TLSConfig:
        if self.insecure and self.mtls:
            raise ValueError("mtls=true needs TLS, but insecure=true turns TLS off")
        return self


class RoundPolicy(_Section):
    """When rounds start, close and fail (design: min_clients, fraction, deadline, stragglers)."""

    rounds: int = Field(default=10, gt=0, le=MAX_COUNT, description="federated rounds to run")
    min_clients: int = Field(
        default=2, gt=0, le=MAX_COUNT, description="a round needs at least this many updates"
    )
    fraction: float = Field(
        default=1.0, gt=0, le=1, description="share of connected clients selected"
    )
    round_deadline_s: float = Field(
        default=600.0, gt=0, description="a round closes after this long"
    )
    straggler_cutoff: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="once this fraction of the selected clients reported, the round may close "
        "early (1.0: wait for all or the deadline)",
    )
    max_retries_on_failed_round: int = Field(
        default=3,
        ge=0,
        le=MAX_COUNT,
        description="a round that misses min_clients is retried this often, then the run ends",
    )
    start_timeout_s: float = Field(
        default=300.0, gt=0, description="wait this long for min_clients before failing a round"
    )
    client_timeout_s: float = Field(
        default=60.0, gt=0, description="a client silent this long counts as offline"
    )
    heartbeat_ms: int = Field(
        default=1000,
        ge=10,
        le=3_600_000,
        description="how often clients poll for the next action (at most an hour)",
    )
    wait_after_min_s: float | None = Field(
        default=None,
        ge=0,
        description="straggler cut-off: close the round this long after min_clients uploaded",
    )


class TransportConfig(_Section):
    """Chunking and gRPC message limits (see crossfed.common.wire)."""

    chunk_size: int = Field(default=1 * MiB, gt=0, description="bytes of payload per chunk message")
    max_message_bytes: int = Field(
        default=4 * MiB,
        gt=0,
        description="gRPC max send/receive message size, set explicitly on channels",
    )
    max_payload_bytes: int = Field(
        default=1024 * MiB, gt=0, description="largest reassembled payload (model/update) accepted"
    )
    download_buffer_idle_s: float = Field(
        default=600.0,
        ge=0,
        le=86_400,
        description="client: keep the model download buffer this many seconds between rounds "
        "(warm pages download ~2.5x faster; lazily freed while idle; 0: free it after each load)",
    )
    upload_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="server: cancel an upload stream that sends nothing for this long and free "
        "its slot and bytes (an idle stream must not hold the server's upload capacity)",
    )
    hash_encrypted_uploads: bool = Field(
        default=False,
        description="SHA-256 the plaintext of an encrypted upload that declares no digest, for "
        "its upload record. Off: the record holds a digest of the chunks' AES-GCM tags, which "
        "the AEAD already checked (about 20% of a 2-core server's upload time saved)",
    )

    @model_validator(mode="after")
    def _chunk_fits_message(self) -> TransportConfig:
        if self.chunk_size + CHUNK_ENVELOPE_BYTES > self.max_message_bytes:
            raise ValueError(
                f"chunk_size {self.chunk_size} plus {CHUNK_ENVELOPE_BYTES} bytes of envelope "
                f"exceeds max_message_bytes {self.max_message_bytes}"
            )
        return self


class _ProjectionPrivacy(_Section):
    """Projection DP (eq. 16), read by both sides: a client noises its releases with these
    values, a server mandates them as the minimum and accounts epsilon per client."""

    #: privacy settings of the other side -> the message that says where they belong
    _OTHER_SIDE: ClassVar[dict[str, str]] = {}

    projection_dp: bool = Field(
        default=True,
        description="clip and noise projections (eq. 16); on a server: mandate it (clients "
        "that send no noise are refused) and account epsilon per client",
    )
    clip: float = Field(default=1.0, gt=0, description="C: L2 clip of each projection")
    noise_multiplier: float = Field(
        default=DEFAULT_PROJECTION_NOISE_MULTIPLIER,
        ge=0,
        le=1000,
        description="sigma: Gaussian noise = sigma * C (the server's value is the minimum its "
        "clients must add). Default 5: a client holding both modalities spends epsilon 9.37 "
        "at delta 1e-5 over the default 10 rounds (9.44 with a calibration round)",
    )
    delta: float = Field(
        default=1e-5, gt=0, lt=1, description="delta of the reported (epsilon, delta)"
    )
    epsilon_budget: float | None = Field(
        default=DEFAULT_EPSILON_BUDGET,
        gt=0,
        description="stop a client's projection releases once its accounted epsilon would "
        "exceed it (server: computed per client from the mandated noise; null: no budget)",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_the_other_sides_settings(cls, data: Any) -> Any:
        """A setting only the other side reads is refused, naming where it belongs, rather
        than silently ignored. One left at its default (e.g. in a dumped config) is dropped:
        it never did anything."""
        if not isinstance(data, Mapping):
            return data
        misplaced = [key for key in data if key in cls._OTHER_SIDE]
        for key in misplaced:
            if not _is_privacy_default(key, data[key]):
                raise ValueError(f"{key} {cls._OTHER_SIDE[key]}")
        return {k: v for k, v in data.items() if k not in misplaced}


class ClientPrivacyConfig(_ProjectionPrivacy):
    """A client's `privacy:` section: projection noise (eq. 16) and optional DP-SGD."""

    _OTHER_SIDE: ClassVar[dict[str, str]] = {
        name: "is a server setting (central DP is applied when the server aggregates): set "
        "it in the server config's privacy section; a client never reads it"
        for name in ("central_dp", "central_dp_clip", "central_dp_noise_multiplier")
    }

    dp_sgd: bool = Field(default=False, description="train locally with Opacus DP-SGD")
    dp_sgd_target_epsilon: float = Field(default=8.0, gt=0)
    dp_sgd_target_delta: float = Field(default=1e-5, gt=0, lt=1)
    dp_sgd_max_grad_norm: float = Field(default=1.0, gt=0)
    dp_sgd_epsilon_budget: float | None = Field(
        default=None,
        gt=0,
        description="stop training once DP-SGD's epsilon over all rounds would exceed it",
    )


class ServerPrivacyConfig(_ProjectionPrivacy):
    """The server's `privacy:` section: the projection-DP mandate (eq. 16) and central DP."""

    _OTHER_SIDE: ClassVar[dict[str, str]] = {
        name: "is a client setting (DP-SGD runs in each client's local training): set it in "
        "the client config's privacy section; the server never reads it"
        for name in (
            "dp_sgd",
            "dp_sgd_target_epsilon",
            "dp_sgd_target_delta",
            "dp_sgd_max_grad_norm",
            "dp_sgd_epsilon_budget",
        )
    }

    central_dp: bool = Field(
        default=False, description="server clips updates and adds noise (around any strategy)"
    )
    central_dp_clip: float = Field(default=1.0, gt=0, description="L2 clip of each client update")
    central_dp_noise_multiplier: float = Field(
        default=1.0, ge=0, description="z: noise std = z * 2 * clip * max_w / W per module"
    )


def _is_privacy_default(key: str, value: object) -> bool:
    """Whether ``value`` (as a file or the environment spells it) is the default of the
    privacy setting ``key`` on the side that owns it."""
    for model in (ClientPrivacyConfig, ServerPrivacyConfig):
        if key in model.model_fields:
            try:
                typed = getattr(model.model_validate({key: value}), key)
            except ValidationError:
                return False
            return bool(typed == model.model_fields[key].default)
    return False


class StrategyConfig(_Section):
    """How uploads become the next global model (server/strategies/): a strategy name and
    the parameters that strategy takes (the server refuses parameters it does not take)."""

    name: str = Field(
        default="fedavg",
        min_length=1,
        description="fedavg (module-aware streaming FedAvg, eq. 15) or another registered "
        "strategy (`crossfed server start --strategy NAME`)",
    )
    server_lr: float | None = Field(default=None, gt=0, le=1000, description="server step size")
    momentum: float | None = Field(default=None, ge=0, lt=1, description="FedAvgM momentum")
    beta1: float | None = Field(default=None, ge=0, lt=1, description="FedAdam/FedYogi beta1")
    beta2: float | None = Field(default=None, ge=0, lt=1, description="FedAdam/FedYogi beta2")
    tau: float | None = Field(default=None, gt=0, le=1, description="adaptivity (Reddi et al.)")
    proximal_mu: float | None = Field(
        default=None,
        ge=0,
        le=MAX_PROXIMAL_MU,
        description="FedProx mu sent to clients (0: plain)",
    )
    logit_adjustment: float | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGIT_ADJUSTMENT,
        description="FedLC tau sent to clients: their classification losses shift the logits "
        "by tau * log(local label prior), against label skew (0: plain; DP-SGD clients skip it)",
    )
    trim_ratio: float | None = Field(
        default=None, ge=0, lt=0.5, description="share trimmed at each end (trimmed mean)"
    )
    krum_f: int | None = Field(
        default=None, ge=0, le=MAX_COUNT, description="Byzantine clients Krum / Multi-Krum tolerate"
    )
    exclude_after: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COUNT,
        description="anchored_mean: leave a client out of later rounds once it was dropped in "
        "this many rounds, at least half of those it took part in (default 2; 0: never)",
    )

    @field_validator("name")
    @classmethod
    def _lower_name(cls, value: str) -> str:
        return value.strip().lower()

    buffer_budget_mb: float = Field(
        default=2048.0,
        gt=0,
        le=1_048_576,
        description="memory the buffering strategies (median, trimmed_mean, krum, multi_krum, "
        "anchored_mean) "
        "may hold for one round's uploads; they cannot stream (about clients x model bytes), so a start "
        "whose min_clients uploads cannot fit is refused, and an upload past it is refused",
    )

    def params(self) -> dict[str, float]:
        """The strategy's own parameters that were set (name and memory budget excluded)."""
        dumped = self.model_dump(exclude={"name", "buffer_budget_mb"})
        return {k: float(v) for k, v in dumped.items() if v is not None}


class UpdateBoundConfig(_Section):
    """Bounded influence of one client on the global model (see server/update_bound.py)."""

    max_norm_ratio: float | None = Field(
        default=DEFAULT_UPDATE_NORM_RATIO,
        gt=0,
        le=1000,
        description="clip each update so that its L2 distance from the global model is at most "
        "this fraction of the global model's L2 norm (over the modules the update trained); "
        "null: off. Default 0.5, from honest runs on the built-in data "
        "(benchmarks/update_norms.py): demo settings max 0.105 (3 seeds, 45 updates), 10 local "
        "epochs at batch 256 max 0.161, 5 epochs at 3x the demo's lr max 0.278",
    )


class ServerConfig(_Section):
    """Everything ``crossfed server`` needs."""

    listen: str = Field(default="127.0.0.1:50051", description="host:port to serve gRPC on")
    state_dir: Path = Field(default=Path("state"), description="SQLite state and checkpoints")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    classes: list[str] | None = Field(
        default=None,
        description="the federation's class names in index order; model.num_classes follows "
        "from it, and a client whose labels or class list do not fit is refused at "
        "registration. Unset: the built-in dataset's 12 classes ('0'..'n-1' when "
        "model.num_classes is set to another count)",
    )
    rounds: RoundPolicy = Field(default_factory=lambda: RoundPolicy())
    transport: TransportConfig = Field(default_factory=lambda: TransportConfig())
    tls: TLSConfig = Field(default_factory=lambda: TLSConfig())
    privacy: ServerPrivacyConfig = Field(default_factory=lambda: ServerPrivacyConfig())
    update_bound: UpdateBoundConfig = Field(default_factory=lambda: UpdateBoundConfig())
    strategy: StrategyConfig = Field(default_factory=lambda: StrategyConfig())
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Prometheus /metrics"
    )
    log_json: bool = Field(default=False, description="structured JSON logs instead of text")
    keep_checkpoints: int = Field(
        default=3, ge=1, le=MAX_COUNT, description="global-model checkpoints kept"
    )
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, description="initial model and client selection seed"
    )
    torch_threads: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="intra-op threads (the server parallelises across uploads)",
    )
    allow_unencrypted_uploads: bool = Field(
        default=False, description="accept plaintext uploads (tests and insecure dev runs only)"
    )

    _listen = field_validator("listen")(_check_address)

    @field_validator("classes")
    @classmethod
    def _clean_classes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_class_names(value)

    @model_validator(mode="after")
    def _classes_set_num_classes(self) -> ServerConfig:
        if self.classes is None or self.model.num_classes == len(self.classes):
            return self
        if "num_classes" in self.model.model_fields_set:
            raise ValueError(
                f"classes names {len(self.classes)} classes but model.num_classes is "
                f"{self.model.num_classes}; drop model.num_classes (it follows from classes)"
            )
        self.model.num_classes = len(self.classes)
        return self

    @property
    def classes_configured(self) -> bool:
        """Whether the class list (or at least the class count) was set, not defaulted."""
        return self.classes is not None or "num_classes" in self.model.model_fields_set

    @property
    def class_names(self) -> list[str]:
        """The federation's classes in index order (configured, or the defaults)."""
        if self.classes is not None:
            return list(self.classes)
        return default_class_names(self.model.num_classes)

    @model_validator(mode="after")
    def _insecure_only_on_loopback(self) -> ServerConfig:
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        if self.tls.insecure and not self.tls.insecure_off_loopback and not _is_loopback(host):
            raise ValueError(
                f"insecure=true serves plaintext without client authentication; listen "
                f"{self.listen} is not a loopback address. Listen on 127.0.0.1, use TLS, or "
                "set tls.insecure_off_loopback (--insecure-off-loopback) to mean it"
            )
        return self


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or a name) only ever means this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MissingModalityConfig(_Section):
    """How the builtin dataset simulates missing modalities (always stated with results)."""

    mode: Literal["per_sample", "per_client"] = Field(
        default="per_sample",
        description="per_sample (PmcmFL): each sample loses a modality with probability `rate`; "
        "per_client (FedMultimodal): each client loses each modality with probability `rate`",
    )
    rate: float = Field(default=0.0, ge=0, le=1)


class BuiltinDataConfig(_Section):
    """The bundled synthetic multimodal dataset, partitioned across clients."""

    kind: Literal["builtin"] = "builtin"
    seed: int = 0
    num_samples: int = Field(default=2000, gt=0)
    client_index: int = Field(default=0, ge=0)
    num_clients: int = Field(default=1, gt=0)
    dirichlet_alpha: float = Field(default=0.5, gt=0, description="label skew; larger is more IID")
    missing: MissingModalityConfig = Field(default_factory=lambda: MissingModalityConfig())
    modality: Literal["both", "text_only", "image_only"] = Field(
        default="both", description="which modalities this client holds"
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> BuiltinDataConfig:
        if self.client_index >= self.num_clients:
            raise ValueError(
                f"client_index {self.client_index} must be below num_clients {self.num_clients}"
            )
        return self


class ManifestDataConfig(_Section):
    """A user's own data: a manifest file listing (text, image path, label) rows."""

    kind: Literal["manifest"] = "manifest"
    path: Path
    skip_bad_rows: bool = Field(
        default=False, description="skip unreadable rows instead of failing"
    )
    class_names: list[str] | None = Field(
        default=None,
        min_length=2,
        description="the federation's class list, in index order; when given it must equal the "
        "server's. Unset: the labels are mapped by name (or index) onto the class list the "
        "server sends at registration",
    )

    modality: None = Field(
        default=None,
        exclude=True,
        description="not a manifest setting: each row's modalities come from its cells",
    )

    @field_validator("modality", mode="before")
    @classmethod
    def _modality_comes_from_rows(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "a manifest takes no modality setting (--modality is for the built-in data): "
                "each row's modalities come from its cells, an empty image cell makes the row "
                "text-only and an empty text cell image-only"
            )

    @field_validator("class_names")
    @classmethod
    def _clean_class_names(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_class_names(value)


def _data_kind(value: Any) -> str:
    """Tag of the data union; a mapping without `kind` means the builtin dataset."""
    if isinstance(value, Mapping):
        return str(value.get("kind", "builtin"))
    return str(getattr(value, "kind", "builtin"))


DataConfig = Annotated[
    Annotated[BuiltinDataConfig, Tag("builtin")] | Annotated[ManifestDataConfig, Tag("manifest")],
    Discriminator(
        _data_kind,
        custom_error_type="invalid_data_kind",
        custom_error_message="kind must be 'builtin' or 'manifest'",
    ),
]


#: Local training per round when a client config says nothing: the one set of defaults, read
#: by the `train:` section and by the trainer's TrainConfig (client/local_trainer.py).
TRAIN_EPOCHS = 1
TRAIN_BATCH_SIZE = 32
TRAIN_LR = 1e-3


class TrainSection(_Section):
    """The `train:` section: local training per round. `TrainConfig.from_section` (the
    trainer's dataclass) is the one mapping onto what the trainer runs with."""

    epochs: int = Field(default=TRAIN_EPOCHS, gt=0)
    batch_size: int = Field(default=TRAIN_BATCH_SIZE, gt=0)
    lr: float = Field(default=TRAIN_LR, gt=0)


class ClientSDConfig(_Section):
    """This client's Stable Diffusion checkpoint for `recovery: stable-diffusion` runs."""

    checkpoint: Path = Field(description="local diffusers checkpoint directory (never fetched)")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto: CUDA when available, else this client keeps feature-space recovery; "
        "cpu / cuda[:N]: run there (cpu: tiny checkpoints, tests)",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="trade UNet recomputation for fine-tuning memory"
    )


#: Reconnect backoff defaults: the one set, read by the `reconnect:` section and by the
#: client's RetryPolicy (client/backoff.py).
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 30.0
RECONNECT_JITTER = 0.2


class ReconnectConfig(_Section):
    """Exponential backoff between reconnect attempts."""

    initial_s: float = Field(default=RECONNECT_INITIAL_S, gt=0)
    max_s: float = Field(default=RECONNECT_MAX_S, gt=0)
    jitter: float = Field(
        default=RECONNECT_JITTER, ge=0, le=1, description="+- fraction of randomness per delay"
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> ReconnectConfig:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s {self.max_s} is below initial_s {self.initial_s}")
        return self


class ClientConfig(_Section):
    """Everything ``crossfed client`` needs."""

    server_address: str = Field(default="127.0.0.1:50051", description="coordinator host:port")
    client_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
        description="stable id; assigned at enrollment when unset",
    )
    data: DataConfig = Field(default_factory=lambda: BuiltinDataConfig())
    cache_dir: Path = Field(
        default=Path(".crossfed-cache"), description="cached encoder embeddings"
    )
    threads: int | None = Field(
        default=None, gt=0, description="torch CPU threads (unset: torch default)"
    )
    train: TrainSection = Field(default_factory=lambda: TrainSection())
    reconnect: ReconnectConfig = Field(default_factory=lambda: ReconnectConfig())
    transport: TransportConfig = Field(default_factory=lambda: TransportConfig())
    enrollment_token: SecretStr | None = Field(
        default=None, description="one-time token for enrollment"
    )
    credentials_path: Path | None = Field(default=None, description="per-client credentials file")
    tls: TLSConfig = Field(default_factory=lambda: TLSConfig())
    privacy: ClientPrivacyConfig = Field(default_factory=lambda: ClientPrivacyConfig())
    stable_diffusion: ClientSDConfig | None = Field(
        default=None, description="Stable Diffusion recovery (eq. 6-7) when the run uses it"
    )
    log_json: bool = False

    _server_address = field_validator("server_address")(_check_address)


# --------------------------------------------------------------------------- loading

ConfigT = TypeVar("ConfigT", bound=BaseModel)
_Sources = dict[tuple[str, ...], str]


def _read_file(path: Path) -> dict[str, Any]:
    """Parse a YAML/TOML config file into a mapping; any failure is a ConfigError."""
    suffix = path.suffix.lower()
    if suffix not in (".yml", ".yaml", ".toml"):
        raise ConfigError(
            f"config: {path}: unsupported file type {suffix or '(none)'!r}; "
            "use .yaml, .yml or .toml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: invalid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config: {path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config: {path}: top level must be a mapping of settings, got {type(data).__name__}"
        )
    return data


def _set_path(target: dict[str, Any], keys: tuple[str, ...], value: object, origin: str) -> None:
    node = target
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if not isinstance(child, dict):
            if child is not None:
                dotted = ".".join(keys[: depth + 1])
                raise ConfigError(
                    f"config: {dotted}: is a value, not a section; cannot set "
                    f"{'.'.join(keys)} [from {origin}]"
                )
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _walk(data: Mapping[str, Any], prefix: tuple[str, ...], origin: str, sources: _Sources) -> None:
    for key, value in data.items():
        path = (*prefix, str(key))
        sources[path] = origin
        if isinstance(value, Mapping):
            _walk(value, path, origin, sources)


def _env_value(raw: str) -> object:
    """Environment values are strings; JSON lists/objects are parsed, scalars left to pydantic."""
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        try:
            parsed: object = json.loads(stripped)
            return parsed
        except json.JSONDecodeError:
            return raw
    return raw


def _env_layer(
    model_cls: type[BaseModel], env: Mapping[str, str], prefix: str
) -> list[tuple[tuple[str, ...], object, str]]:
    """(path, value, origin) for every env var under ``prefix`` naming a top-level field.

    Variables whose first segment is not a field of the model are ignored: the prefix is shared
    with unrelated settings (e.g. CROSSFED_VENV used by ./dev). Deeper typos are errors.
    """
    layer = []
    for name in sorted(env):
        if not name.upper().startswith(prefix.upper()) or len(name) == len(prefix):
            continue
        keys = tuple(part.lower() for part in name[len(prefix) :].split("__"))
        if keys[0] not in model_cls.model_fields or any(not k for k in keys):
            continue
        layer.append((keys, _env_value(env[name]), f"env {name}"))
    return layer


def _override_layer(
    overrides: Mapping[str, object],
) -> list[tuple[tuple[str, ...], object, str]]:
    layer = []
    for dotted, value in overrides.items():
        keys = tuple(dotted.split("."))
        if not dotted or any(not k for k in keys):
            raise ConfigError(f"config: override {dotted!r}: expected dotted field names")
        layer.append((keys, value, f"override {dotted}"))
    return layer


def _describe_value(value: object, secret: bool) -> str:
    if secret:
        return "'***'"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _annotation_models(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes a field annotation may hold (unwrapping Annotated/Optional/unions)."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is None:
        return []
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found.extend(_annotation_models(arg))
    return found


def _field_path(model_cls: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """Map a pydantic error location to config keys, dropping union tags like 'builtin'."""
    out: list[str] = []
    candidates: list[type[BaseModel]] = [model_cls]
    for part in loc:
        key = str(part)
        owner = next((m for m in candidates if key in m.model_fields), None)
        if owner is not None:
            out.append(key)
            info: FieldInfo = owner.model_fields[key]
            candidates = _annotation_models(info.annotation)
            continue
        tagged = [m for m in candidates if _tag_of(m) == key]
        if tagged:
            candidates = tagged  # a discriminated-union tag, not a config key
            continue
        out.append(key)
        candidates = []
    return tuple(out)


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    return field.default if field is not None and isinstance(field.default, str) else None


def _suggest(model_cls: type[BaseModel], path: tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for an unknown key close to a real one."""
    candidates: list[type[BaseModel]] = [model_cls]
    for key in path[:-1]:
        owner = next((m for m in candidates if key in m.model_fields), None)
        if owner is None:
            return ""
        candidates = _annotation_models(owner.model_fields[key].annotation)
    names = [name for m in candidates for name in m.model_fields]
    if path[-1] in names:  # a field of another member of a union (e.g. the other data kind)
        return " for this kind of section"
    close = difflib.get_close_matches(path[-1], names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _origin_of(path: tuple[str, ...], sources: _Sources) -> str | None:
    """Where the offending value came from: the key itself, a parent section or a child key."""
    for n in range(len(path), 0, -1):
        if path[:n] in sources:
            return sources[path[:n]]
    inside = [origin for keys, origin in sources.items() if keys[: len(path)] == path]
    return inside[-1] if inside else None


def _format_errors(
    model_cls: type[BaseModel], exc: ValidationError, sources: _Sources
) -> ConfigError:
    parts = []
    for error in exc.errors(include_url=False):
        path = _field_path(model_cls, tuple(error["loc"]))
        dotted = ".".join(path) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = "unknown field" + _suggest(model_cls, path)
        else:
            message = error["msg"].removeprefix("Value error, ")
            if (
                error["type"] != "missing"
                and not isinstance(error["input"], Mapping)
                and "got " not in message
            ):
                secret = any(hint in dotted.lower() for hint in _SECRET_HINTS)
                message += f" (got {_describe_value(error['input'], secret)})"
        origin = _origin_of(path, sources)
        parts.append(f"{dotted}: {message}" + (f" [from {origin}]" if origin else ""))
    return ConfigError("config: " + "; ".join(parts))


def load_config(
    model_cls: type[ConfigT],
    path: Path | None = None,
    *,
    env_prefix: str = "CROSSFED_",
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ConfigT:
    """Build ``model_cls`` from a file, then environment variables, then overrides (last wins).

    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment. ``overrides``
    keys are dotted field paths (``"rounds.min_clients"``); a ``None`` value sets the field to
    None, so a CLI should pass only the flags the user gave. Relative paths in the result are
    kept as written (relative to the working directory).
    """
    merged: dict[str, Any] = {}
    sources: _Sources = {}
    if path is not None:
        path = Path(path)
        merged = _read_file(path)
        _walk(merged, (), f"file {path}", sources)
    layers = _env_layer(model_cls, os.environ if env is None else env, env_prefix)
    layers += _override_layer(overrides or {})
    for keys, value, origin in layers:
        _set_path(merged, keys, value, origin)
        if isinstance(value, Mapping):
            _walk(value, keys, origin, sources)
        sources[keys] = origin
    try:
        return model_cls.model_validate(merged)
    except ValidationError as exc:
        raise _format_errors(model_cls, exc, sources) from None
