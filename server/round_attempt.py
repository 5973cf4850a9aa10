"""One attempt of a round, from its opening to its commit. A training attempt folds weighted
updates into its strategy's aggregator (eq. 15); a calibration attempt sums the per-class
feature statistics of clients holding images (server/calibration_round.py). The engine and the
upload path treat both alike: what differs between the two kinds lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
from crossfed.server.aggregation import module_weights_of
from crossfed.server.calibration_round import CalibrationStep, StatsSum, calibrated_model
from crossfed.server.round_commit import PreparedCommit, RoundCommitter
from crossfed.server.state.records import RoundRecord
from crossfed.server.strategies.base import RoundAggregator, RoundInstructions
from crossfed.server.update_bound import BoundCheck, UpdateBounder
from crossfed.server.update_validation import TensorSlot, required_keys

# Actions (values match crossfed.v1.Action so the servicer can pass them through).
ACTION_WAIT = 1
ACTION_TRAIN = 2
ACTION_DONE = 3
ACTION_REGISTER = 4
ACTION_CALIBRATE = 5


@dataclass(frozen=True)
class UploadTerms:
    """What one upload into an attempt must be: per-module weights, the tensors' spec and the
    keys it must carry (None: all of spec)."""

    weights: dict[str, float]
    spec: Mapping[str, TensorSlot]
    required: frozenset[str] | None


@dataclass(kw_only=True)
class RoundAttempt:
    """The bookkeeping both kinds share: who uploaded, when min_clients was reached, and the
    sample-weighted sums of the clients' reported metrics."""

    record: RoundRecord
    uploaders: dict[str, str] = field(default_factory=dict)  # client_id -> upload_id
    min_reached_at: float | None = None
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)

    action = ACTION_TRAIN
    is_calibration = False
    verb = "train round"

    @property
    def asks(self) -> RoundInstructions:
        """What this attempt asks of the clients' local training (nothing by default)."""
        return RoundInstructions()

    def check_upload(
        self,
        client_id: str,
        tensors: Mapping[str, torch.Tensor],
        num_samples: int,
        metrics: Mapping[str, float],
    ) -> None:
        """Checks past the tensor spec (outside the lock); a training update needs none."""

    def add_metrics(self, metrics: Mapping[str, float], num_samples: int) -> None:
        """Add one client's reported metrics, weighted by its samples."""
        for key, value in metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value * num_samples
            self.metric_weights[key] = self.metric_weights.get(key, 0.0) + num_samples

    def mean_metrics(self) -> dict[str, float]:
        """The sample-weighted mean of every reported metric."""
        return {
            k: self.metric_sums[k] / self.metric_weights[k]
            for k in self.metric_sums
            if self.metric_weights[k] > 0
        }


@dataclass(kw_only=True)
class TrainingAttempt(RoundAttempt):
    """A training round's attempt: the strategy's aggregator, its instructions to the clients
    and, with an update bound, the bounder that measures every update."""

    aggregator: RoundAggregator
    instructions: RoundInstructions = field(default_factory=RoundInstructions)
    bounder: UpdateBounder | None = None

    @property
    def asks(self) -> RoundInstructions:
        """The strategy's instructions for this round."""
        return self.instructions

    def min_uploads(self, min_clients: int) -> int:
        """Uploads this attempt needs to commit."""
        return min_clients

    def upload_terms(
        self,
        num_samples: int,
        module_samples: Mapping[str, int],
        spec: Mapping[str, TensorSlot],
        module_of: Callable[[str], str],
    ) -> UploadTerms:
        """Per-module weights of eq. 15; the keys of the modules given weight are required."""
        weights = module_weights_of(num_samples, module_samples, self.aggregator.modules)
        return UploadTerms(weights, spec, required_keys(spec, weights, module_of))

    def bound_check(
        self, tensors: Mapping[str, torch.Tensor], weights: Mapping[str, float]
    ) -> BoundCheck | None:
        """Measure an update against the update bound (None without one)."""
        if self.bounder is None:
            return None
        return self.bounder.check(tensors, self.aggregator.contributed_keys(weights))

    def fold(
        self,
        tensors: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        bound: BoundCheck | None,
        client: str,
    ) -> None:
        """Fold ``client``'s validated update into the aggregate (scaled down if the bound
        clipped it)."""
        self.aggregator.add(tensors, weights, num_samples, bound.scale if bound else 1.0, client)

    def prepare(
        self,
        committer: RoundCommitter,
        global_state: dict[str, torch.Tensor],
        run_id: str,
        reason: str,
    ) -> tuple[PreparedCommit, str]:
        """Aggregate, step the strategy and checkpoint (outside the engine's lock)."""
        prepared = committer.prepare_training(
            self.record.round, run_id, global_state, self.aggregator
        )
        return prepared, reason


@dataclass(kw_only=True)
class CalibrationAttempt(RoundAttempt):
    """The calibration round's attempt: statistics, not weights; every online client holding
    images is selected, and it commits with what came (at most min_clients needed)."""

    step: CalibrationStep
    # counts the statistics' privacy cost before they are used (raises past the budget)
    admit_release: Callable[[str, Mapping[str, float], int], object]
    stats: StatsSum = field(init=False)

    action = ACTION_CALIBRATE
    is_calibration = True
    verb = "send calibration statistics for round"

    def __post_init__(self) -> None:
        self.stats = StatsSum(self.step.spec)

    def min_uploads(self, min_clients: int) -> int:
        """At most min_clients: the selection is whoever holds images."""
        return min(min_clients, len(self.record.selected))

    def upload_terms(
        self,
        num_samples: int,
        module_samples: Mapping[str, int],
        spec: Mapping[str, TensorSlot],
        module_of: Callable[[str], str],
    ) -> UploadTerms:
        """Statistics carry no weights; every tensor of the statistics' spec is required."""
        return UploadTerms({}, self.step.spec, None)

    def check_upload(
        self,
        client_id: str,
        tensors: Mapping[str, torch.Tensor],
        num_samples: int,
        metrics: Mapping[str, float],
    ) -> None:
        """Plausible against the declared rows; the release counted against the budget."""
        self.step.check(tensors, num_samples)
        self.admit_release(client_id, metrics, num_samples)

    def bound_check(
        self, tensors: Mapping[str, torch.Tensor], weights: Mapping[str, float]
    ) -> BoundCheck | None:
        """Statistics are not model updates: no bound."""
        return None

    def fold(
        self,
        tensors: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        bound: BoundCheck | None,
        client: str,
    ) -> None:
        """Add one client's (validated) statistics to the exact sum."""
        self.stats.add(tensors)

    def prepare(
        self,
        committer: RoundCommitter,
        global_state: dict[str, torch.Tensor],
        run_id: str,
        reason: str,
    ) -> tuple[PreparedCommit, str]:
        """Fit the image-only last layers once and checkpoint the calibrated model."""
        new_state, reason = calibrated_model(
            self.step, global_state, self.stats, committer.spec, reason
        )
        return committer.write(self.record.round, run_id, new_state), reason


Attempt: TypeAlias = "TrainingAttempt | CalibrationAttempt"


@dataclass(frozen=True)
class Closing:
    """An attempt that stopped taking uploads and waits for (or is in) its commit."""

    attempt: Attempt
    reason: str
