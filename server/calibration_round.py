"""The calibration round that follows the last training round when the model asks for it
(`ModelConfig.calibrate_image_classifier` / `calibrate_text_classifier`, CCVR;
common/model/classifier_calibration.py).

The round engine runs it like a training round numbered ``total_rounds + 1``: clients that
hold rows of a calibrated path's modality get ACTION_CALIBRATE, download the final global
model, and upload per-class feature statistics through the same encrypted chunked upload
path. The server adds them
(`StatsSum`), fits each path's last layers once (`CalibrationStep.fit`) and commits the
calibrated model as the run's last checkpoint. The engine sees only this module's
`CalibrationStep`; what the statistics mean lives with the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelError, ModelInputError
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.update_validation import TensorSlot, validate_update

FitCalibration = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
    tuple[dict[str, torch.Tensor] | None, str],
]
CheckStats = Callable[[Mapping[str, torch.Tensor], int], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationStep:
    """What the engine needs for a calibration round: the statistics' tensor spec, a
    plausibility check of one client's statistics against its declared sample count
    (raises `InvalidUpdateError`), and the fit from (global state, summed statistics) to
    (the calibrated global state, what was done); state None: too little or too noisy
    data, the model stays as it is, and the message says why."""

    spec: Mapping[str, TensorSlot]
    check: CheckStats
    fit: FitCalibration
    paths: tuple[str, ...] = ("image",)  # the calibrated inference paths ("image", "text")

    def wants(self, rows_with_image: bool, rows_with_text: bool) -> bool:
        """Whether a client holding such rows has statistics to send."""
        return ("image" in self.paths and rows_with_image) or (
            "text" in self.paths and rows_with_text
        )


class StatsSum:
    """Exact float64 sum of every accepted client's statistics (sufficient statistics add;
    no weighting: each client's counts already carry its share)."""

    def __init__(self, spec: Mapping[str, TensorSlot]) -> None:
        self._sum = {k: torch.zeros(s.shape, dtype=torch.float64) for k, s in spec.items()}
        self.contributors = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fold one client's (validated) statistics in."""
        for key, acc in self._sum.items():
            acc.add_(tensors[key].to(torch.float64))
        self.contributors += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The summed statistics (copies)."""
        return {k: v.clone() for k, v in self._sum.items()}


def ccvr_calibration_step(config: ModelConfig, seed: int = 0) -> CalibrationStep:
    """The CCVR calibration of `CrossModalNet`'s last layers on ``config``'s calibrated
    paths."""
    from crossfed.common.model.classifier_calibration import (
        calibrated_state,
        check_client_stats,
        stats_from_tensors,
        stats_shapes,
    )

    spec = {k: TensorSlot(torch.float64, shape) for k, shape in stats_shapes(config).items()}
    paths = config.calibration_paths()

    def check(tensors: Mapping[str, torch.Tensor], num_samples: int) -> None:
        try:
            check_client_stats(tensors, num_samples, paths)
        except ModelInputError as exc:
            raise InvalidUpdateError(f"calibration statistics rejected: {exc}") from exc

    def fit(
        global_state: Mapping[str, torch.Tensor], summed: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor] | None, str]:
        try:
            stats = stats_from_tensors(summed, paths)
            return calibrated_state(config, global_state, stats, seed)
        except (ModelError, torch.linalg.LinAlgError) as exc:
            log.error("calibration fit failed, the model stays uncalibrated: %s", exc)
            return None, f"the fit failed ({exc}); left uncalibrated"

    return CalibrationStep(spec=spec, check=check, fit=fit, paths=paths)


def calibrated_model(
    step: CalibrationStep,
    global_state: Mapping[str, torch.Tensor],
    stats: StatsSum,
    spec: Mapping[str, TensorSlot],
    reason: str,
) -> tuple[dict[str, torch.Tensor], str]:
    """The calibration round's new global model and commit message: the fitted model when it
    validates against the global ``spec``, else ``global_state`` (left uncalibrated)."""
    started = time.perf_counter()
    fitted, what = step.fit(global_state, stats.result())
    what = f"{reason}; {stats.contributors} client(s): {what}"
    took = f" ({time.perf_counter() - started:.1f} s)"
    if fitted is None:
        return dict(global_state), what + took
    try:
        validate_update(fitted, spec, what="calibrated model")
    except InvalidUpdateError as exc:
        log.error("calibration produced an unusable model: %s", exc)
        return dict(global_state), f"{reason}; the fit failed ({exc}), left uncalibrated"
    return fitted, what + took
