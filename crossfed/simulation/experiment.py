"""The experiment file `crossfed simulate` runs (YAML or TOML, loaded with
`crossfed.common.config.load_config`): data, how it is split over virtual clients and how
modalities go missing, rounds and their client policy, local training, the aggregation
strategy, byzantine clients (benchmarks only), the methods compared, seeds, and where the
clients run (Ray or inline).

Every field is validated; a bad value is one line naming it. The network's input sizes and
class count come from the data, so `model` takes every other `ModelConfig` field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from crossfed.common.config import MAX_COUNT, MissingModalityConfig, load_config
from crossfed.common.model.model_config import ModelConfig
from crossfed.simulation.byzantine import AttackKind
from crossfed.simulation.methods import ALL_METHODS

#: Environment variables that override an experiment file (``CROSSFED_SIM_ROUNDS__ROUNDS=3``).
ENV_PREFIX = "CROSSFED_SIM_"
#: ModelConfig fields the data decides.
DATA_DECIDES = ("text_dim", "image_dim", "num_classes")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _DataCommon(_Section):
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="held-out share (evaluated per Table I configuration)"
    )
    cache_dir: Path = Field(
        default=Path(".crossfed-cache"),
        description="embedding cache: the data is encoded once (eq. 1)",
    )
    text_encoder: str = Field(
        default="minilm", description="text encoder (or a local HF model dir)"
    )
    image_encoder: str = Field(default="cnn", description="image encoder (or a local HF model dir)")


class BuiltinSimData(_DataCommon):
    """The bundled synthetic shapes (12 classes), encoded once through the cache."""

    kind: Literal["builtin"] = "builtin"
    num_samples: int = Field(default=10_000, gt=0, le=10_000_000)
    seed: int = Field(default=0, ge=0, description="seed of the generated dataset")
    image_size: int = Field(default=32, ge=8, le=512)


class ManifestSimData(_DataCommon):
    """A user's manifest (CSV/JSONL: image, text, label); empty cells are missing modalities."""

    kind: Literal["manifest"]
    path: Path
    class_names: list[str] | None = Field(
        default=None,
        min_length=2,
        description="class list in index order (default: the labels seen)",
    )
    skip_bad_rows: bool = False
    image_size: int = Field(default=32, ge=8, le=512)


class EmbeddingsSimData(_DataCommon):
    """A pre-encoded EmbeddingSet (.safetensors, e.g. written by the quality benchmark)."""

    kind: Literal["embeddings"]
    path: Path


def _data_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "builtin"))
    return str(getattr(value, "kind", "builtin"))


SimData = Annotated[
    Annotated[BuiltinSimData, Tag("builtin")]
    | Annotated[ManifestSimData, Tag("manifest")]
    | Annotated[EmbeddingsSimData, Tag("embeddings")],
    Discriminator(
        _data_kind,
        custom_error_type="invalid_data_kind",
        custom_error_message="kind must be 'builtin', 'manifest' or 'embeddings'",
    ),
]


class FederationSection(_Section):
    """How the training split is dealt to virtual clients and how modalities go missing."""

    clients: int = Field(default=10, gt=0, le=MAX_COUNT)
    dirichlet_alpha: float = Field(default=0.5, gt=0, description="label skew; larger is more IID")
    missing: MissingModalityConfig = Field(default_factory=lambda: MissingModalityConfig())
    min_samples_per_client: int = Field(
        default=1,
        ge=1,
        description="the Dirichlet split is redrawn until every client has this many",
    )


class RoundsSection(_Section):
    """Rounds, client sampling and what a failed client costs."""

    rounds: int = Field(default=10, gt=0, le=MAX_COUNT)
    fraction: float = Field(
        default=1.0, gt=0, le=1, description="share of clients sampled per round"
    )
    min_clients: int = Field(
        default=1,
        gt=0,
        le=MAX_COUNT,
        description="a round needs this many updates, else the run fails",
    )
    client_retries: int = Field(
        default=1,
        ge=0,
        le=100,
        description="a client whose process dies or raises is rerun this often",
    )
    on_client_failure: Literal["drop", "fail"] = Field(
        default="drop", description="after its retries: leave the client out of the round, or stop"
    )
    eval_every: int = Field(
        default=1,
        ge=1,
        le=MAX_COUNT,
        description="score the global model every N rounds (and the last)",
    )


class TrainSection(_Section):
    """Local training per round (and the central references' budget)."""

    local_epochs: int = Field(default=1, gt=0, le=10_000)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=2e-3, gt=0)
    modality_dropout: float = Field(
        default=0.5, ge=0, le=1, description="the dropout baseline's modality dropout"
    )
    ours_dropout: float = Field(default=0.0, ge=0, le=1, description="modality dropout of ours")
    central_epochs: int = Field(
        default=10, gt=0, le=10_000, description="central references' epochs"
    )


class StrategySection(_Section):
    """How a round's updates become the next global model (crossfed/simulation/strategy.py:
    the server's strategies by name, with their parameters)."""

    name: str = Field(
        default="fedavg",
        description="a server strategy by name; fedavg = module-aware streaming FedAvg (eq. 15)",
    )
    params: dict[str, float] = Field(
        default_factory=dict,
        description="the strategy's parameters (server_lr, momentum, trim_ratio, krum_f, "
        "proximal_mu: FedProx's mu/2 ||w - w_global||^2 in every client's local objective, "
        "logit_adjustment: FedLC's tau, the clients' label-prior shift of the logits)",
    )

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from crossfed.simulation.strategy import strategy_names

        known = strategy_names()
        if value not in known:
            raise ValueError(f"unknown strategy {value!r}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _buildable(self) -> StrategySection:
        from crossfed.simulation.simulation_errors import SimulationError
        from crossfed.simulation.strategy import make_strategy

        try:
            make_strategy(self.name, lambda key: key, self.params)
        except SimulationError as exc:  # names what is wrong
            raise ValueError(str(exc)) from None
        return self


class AttackSection(_Section):
    """Byzantine clients, for robustness benchmarks only (crossfed/simulation/byzantine.py):
    ``clients`` of the federation, drawn per seed, poison every update they send."""

    kind: AttackKind = Field(
        default="none",
        description="none; scale: theta_g + factor*(theta_i - theta_g); "
        "sign_flip: theta_g - (theta_i - theta_g); withhold: theta_g (a free rider)",
    )
    clients: int = Field(default=0, ge=0, le=MAX_COUNT, description="how many clients attack")
    factor: float = Field(default=100.0, gt=0, le=1e6, description="the scale attack's boost")

    @model_validator(mode="after")
    def _consistent(self) -> AttackSection:
        if (self.kind == "none") != (self.clients == 0):
            raise ValueError(
                f"attack kind {self.kind!r} with {self.clients} attacking clients: an attack "
                "needs clients >= 1, and clients > 0 needs an attack kind"
            )
        return self


class ExecutionSection(_Section):
    """Where virtual clients run: Ray tasks (an embedded instance or a cluster), or inline."""

    backend: Literal["ray", "inline"] = Field(
        default="ray",
        description="ray: Ray tasks; inline: one after another in this process (debug)",
    )
    address: str | None = Field(
        default=None,
        description="join this Ray cluster ('auto' or host:port); unset: start one here",
    )
    num_cpus: int | None = Field(
        default=None, gt=0, description="CPUs of the embedded Ray instance (unset: this machine's)"
    )
    cpus_per_client: float = Field(
        default=1.0,
        gt=0,
        le=1024,
        description="Ray CPU share per virtual client (whole ones = threads)",
    )
    object_store_mb: int = Field(
        default=512, ge=78, description="object store of the embedded Ray instance (MiB)"
    )
    temp_dir: Path | None = Field(
        default=None,
        description="Ray's session directory (unset: a fresh one under /tmp, removed after)",
    )
    max_in_flight: int | None = Field(
        default=None,
        gt=0,
        description="client tasks queued at once (unset: 4 per client slot, at least 8)",
    )
    concurrent_runs: int = Field(
        default=1, gt=0, le=256, description="(method, seed) runs driven at the same time"
    )


class ExperimentConfig(_Section):
    """One `crossfed simulate` experiment: every method below, for every seed."""

    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    data: SimData = Field(default_factory=lambda: BuiltinSimData())
    federation: FederationSection = Field(default_factory=lambda: FederationSection())
    rounds: RoundsSection = Field(default_factory=lambda: RoundsSection())
    train: TrainSection = Field(default_factory=lambda: TrainSection())
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="ModelConfig fields (hidden_dim, loss_weights, ...); dims and classes "
        "come from the data",
    )
    strategy: StrategySection = Field(default_factory=lambda: StrategySection())
    attack: AttackSection = Field(default_factory=lambda: AttackSection())
    methods: list[str] = Field(
        default_factory=lambda: ["ours", "zero_fill", "dropout", "ceiling_text", "ceiling_image"],
        min_length=1,
        description="federated methods and central references, by name",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    execution: ExecutionSection = Field(default_factory=lambda: ExecutionSection())

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(ALL_METHODS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"methods are listed twice: {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _attackers_fit(self) -> ExperimentConfig:
        if self.attack.clients > self.federation.clients:
            raise ValueError(
                f"attack.clients {self.attack.clients} exceeds federation.clients "
                f"{self.federation.clients}"
            )
        return self

    @field_validator("model")
    @classmethod
    def _model_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        decided = sorted(set(value) & set(DATA_DECIDES))
        if decided:
            raise ValueError(f"{decided} come from the data; drop them from model")
        ModelConfig.model_validate(value)  # unknown keys and bad values fail here
        return value

    def model_config_for(self, text_dim: int, image_dim: int, num_classes: int) -> ModelConfig:
        """The network for data of these sizes."""
        dims = {"text_dim": text_dim, "image_dim": image_dim, "num_classes": num_classes}
        return ModelConfig.model_validate({**self.model, **dims})


def load_experiment(
    path: Path,
    overrides: dict[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> ExperimentConfig:
    """Read an experiment file (YAML or TOML), then ``CROSSFED_SIM_*`` variables, then
    ``overrides`` (dotted keys); ``env`` defaults to ``os.environ``. Raises `ConfigError`
    with one line naming the field."""
    return load_config(ExperimentConfig, path, env_prefix=ENV_PREFIX, env=env, overrides=overrides)
