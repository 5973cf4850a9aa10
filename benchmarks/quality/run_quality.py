"""Federated quality benchmark (issue 7, quality half): the paper's method vs zero-fill and
modality-dropout FedAvg, ablations, a central paired upper bound and unimodal ceilings, over
missing rate x missingness mode x Dirichlet alpha. The grid becomes experiment files (one per
federation setup, under results/.cache/experiments/) run by the simulator behind `crossfed
simulate` (real client trainer, real server aggregation, virtual clients on Ray). Prints
markdown, writes benchmarks/results/quality.json, PNG plots and the Quality section of
BENCHMARKS.md.

    python benchmarks/quality/run_quality.py [--profile full|smoke] [--workers 16]
        [--embeddings FILE] [--ray-address ADDR] [--report-only --records FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

_BENCHMARKS = Path(__file__).resolve().parents[1]
_REPO = _BENCHMARKS.parent
if str(_BENCHMARKS) not in sys.path:  # `quality.*` is a folder of scripts, not a package
    sys.path.insert(0, str(_BENCHMARKS))

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crossfed.simulation.experiment import TrainSection
from crossfed.simulation.federation_data import FederationSetup, Missingness
from crossfed.simulation.gap_closure import MeanStd
from crossfed.simulation.methods import ABLATIONS, BASELINES, FED_CEILINGS, VARIANTS
from crossfed.simulation.simulation_errors import SimulationError
from quality.quality_errors import QualityBenchmarkError
from quality.quality_report import (
    ablation_reading,
    ablation_table,
    headline_table,
    summarise_point,
    sweep_rows,
    sweep_table,
    target_checks,
    write_plots,
    write_section,
)
from quality.sweep import GridSettings, SweepPlan, plan_jobs, read_records, run_jobs

ALL_MISSINGNESS: tuple[Missingness, ...] = ("per_sample", "per_client")
METHOD_NOTES = """\
Changes to the method relative to the paper (each explained in the module docstrings):
- **Eq. 9 classifier as an MLP with input LayerNorm** (`common/model/network.py`). The literal
  `Linear(f_t)` stayed near chance after federated training (0.24 test accuracy at the
  headline, 10 rounds, batch 256) because unit-norm sentence embeddings make a bare linear
  layer learn slowly, so VLMR retrieved the wrong class's memories. It has the fusion path's
  depth (two LayerNorm/SiLU layers): with one hidden layer it stayed below the dropout
  baseline's fused head on text-only (headline seed 1: ensemble 0.720 vs 0.738 with two).
- **Unimodal ensemble for missing configurations** (`ModelConfig.unimodal_ensemble`, default on).
  Eq. 9 says that when a modality is missing "the classifier predicts a label based on the
  available features"; we add its log-probabilities to the fusion head's (Table I path). A
  twin `image_classifier` over f_i does the same for image-only rows (not in the paper). Both
  are trained on every row holding their modality (module-aware FedAvg weights them by those
  rows), so they do not suffer the shared fusion head's drift between clients that fill the
  slots differently. Ablation `no_unimodal_ensemble` = Table I as written.
- **Paired ensemble** (`ModelConfig.paired_ensemble`, default on). Paired rows add both
  unimodal classifiers' log-probabilities to the fusion head's. Under per-client missingness
  few clients hold paired rows, so the fusion head's paired path is the least trained part
  of the model: in the previous grid ours lost 3.6-4.6 points on paired inputs to the best
  baseline at per-client rate 0.7-0.9 (α 0.5 and 5). An evaluation-only check on those trained
  models (seed 0/1): fusion alone 0.934-0.957, with the unimodal classifiers 0.988-0.993; at the
  headline 0.991 → 0.995. A label carried only by the interaction of the modalities leaves the
  unimodal posteriors flat, so the fusion head still decides there (unit test: (text class +
  image class) mod 3). Ablation `no_paired_ensemble`.
- **CCVR calibration of the image-only path: reported as the variant `ours_calibrated`, an
  opt-in beside ours** (`ModelConfig.calibrate_image_classifier`, default off; not in the paper;
  CCVR is Luo et al., NeurIPS 2021). Image-only accuracy was
  held back by client drift under label skew, not by the missing text: the federated
  image-only ceiling matched the baselines, and an oracle refit of the image classifier's last
  layer on the real pooled training features closed most of the gap to the central ceiling
  (headline, 3 seeds: 0.745 -> 0.761). After the last round every client sends, per class,
  count / sum / sum of outer products of the two image-only last-layer inputs (image
  classifier body; fusion output on (f_i, f^_t)) under the final global model; the server
  draws 2000 virtual features per class from the pooled Gaussians and refits copies of the
  two last layers (`image_calibration`, `head_calibration`), used only for image-only rows
  (refitting the shared image classifier layer in place cost paired inputs 0.4 points).
  Headline: image-only 0.745 -> 0.763 (image classifier alone 0.762), text-only and paired
  unchanged; per-client rate 0.5 α 0.5: 0.739 -> 0.766; per-sample rate 0.7 α 0.1: 0.714 ->
  0.756. The gRPC coordinator runs the same step as a calibration round after the last
  training round (server/calibration_round.py; end-to-end test in
  tests/integration/test_federation_run.py). It stays off by default, so ours is measured
  without it. The statistics are per-class feature moments; under projection DP (the
  deployed default) clients clip the features to sqrt(h) and add Gaussian noise with the
  projection noise multiplier, accounted with the projections (common/privacy/calibration_dp.py),
  and the server fits only if the class means stand out of the noise. Headline, 3 seeds,
  trained models of this simulation: image-only uncalibrated 0.764 / 0.728 / 0.742, exact
  0.773 / 0.763 / 0.755, noised σ 0.5: 0.763 / 0.758 / 0.747, σ 1: 0.759 / 0.757 / 0.743,
  σ 2: 0.757 / 0.749 / 0.731 (σ 1 keeps +0.8 of the +1.9 points; seed 0 loses 0.5). A pooled,
  shrunk or isotropic covariance instead of the per-class one changed σ-1 results by ≤ 0.1.
  On 240-row clients (end-to-end test) noised statistics drove image-only from 0.92 to 0.30
  before the signal-to-noise guard, which now skips such fits. The simulation runs every
  method without DP noise (projections included), so `ours_calibrated` is the exact variant.
  Stats computed instead on the locally trained models of the last round (what the
  projection exchange could carry today) gave 0.747, and on the last round's downloaded
  model 0.757: the refit needs the final model's features, i.e. a round of its own.
- **Posterior-mean recovery at inference** (`ModelConfig.diffusion_sample_steps` default 10 → 1).
  The x0-predicting denoiser's one-step estimate from noise is E[f_i | f_t], which is what
  the fusion MLP sees in training (`train_recovery_steps=1`); 10-step DDIM draws a sample the
  head never saw. Measured at the headline (1 seed, batch 256): text-only 0.59 → 0.69.
- **No modality dropout for ours** (`TrainingBudget.ours_dropout = 0`; the dropout baseline
  keeps 0.5). With the unimodal classifiers carrying the missing configurations, dropout only
  taught the fusion head to trust recovered slots and cost it paired accuracy (headline seed 0:
  both 0.939 with dropout 0.5 vs 0.956 without; text-only 0.729 vs 0.735, image-only 0.314 vs
  0.313). Ablation `with_dropout` measures it over all seeds.
- **VLMR for text-only recovery by default** (`ModelConfig.text_only_recovery`, Table I allows
  "Diffusion or VLMR"). The one-step diffusion estimate E[f_i | f_t] is a blurred mean: the
  image classifier scores it at chance (0.10 vs 0.75 on memory-retrieved features, headline,
  3 seeds), and fusing it cost text-only accuracy against the text classifier alone. VLMR hands
  the head real image features of the eq.-9 class (global prototypes when the local memory
  has none). Previous run (random CNN): +0.5 points text-only; pretrained CNN: +0.7. Ablation
  `diffusion_recovery` measures the paper's diffusion path.
- **Short-schedule fix** (`client/local_trainer.py`): OneCycleLR divided by zero for a client
  with exactly 10 optimizer steps; schedules under 20 steps now use a constant LR.
"""


class QualitySettings(BaseModel):
    """Validated command-line input."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["full", "smoke"] = "full"
    samples: int = Field(10_000, gt=50)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    clients: int = Field(10, gt=0)
    rounds: int = Field(10, gt=0)
    local_epochs: int = Field(1, gt=0)
    central_epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    dropout: float = Field(0.5, ge=0, le=1)
    hidden_dim: int = Field(128, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rates: list[float] = Field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7, 0.9], min_length=1)
    alphas: list[float] = Field(default_factory=lambda: [0.1, 0.5, 5.0], min_length=1)
    missingness: list[Missingness] = Field(
        default_factory=lambda: list(ALL_MISSINGNESS), min_length=1
    )
    headline_missingness: Missingness = "per_sample"
    headline_rate: float = Field(0.5, ge=0, le=1)
    headline_alpha: float = Field(0.5, gt=0)
    workers: int = Field(
        max(1, (os.cpu_count() or 2) - 1), gt=0, description="runs driven at once (Ray tasks)"
    )
    backend: Literal["ray", "inline"] = "ray"
    ray_address: str | None = None
    deadline_s: float | None = Field(None, gt=0)
    embeddings: Path | None = None
    cache_dir: Path = _REPO / ".crossfed" / "cache"
    results_dir: Path = _BENCHMARKS / "results"
    records: Path | None = None
    benchmarks_md: Path = _REPO / "BENCHMARKS.md"
    report_only: bool = False
    note: str = Field("", description="run-specific remark printed under the section title")
    progress: bool = True

    def grid(self, embeddings: Path) -> GridSettings:
        return GridSettings(
            embeddings=embeddings,
            test_fraction=self.test_fraction,
            hidden_dim=self.hidden_dim,
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            central_epochs=self.central_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            modality_dropout=self.dropout,
            backend=self.backend,
            ray_address=self.ray_address,
            concurrent_runs=self.workers,
        )

    def headline(self) -> FederationSetup:
        return FederationSetup(
            self.headline_missingness, self.headline_rate, self.headline_alpha, self.clients, 0
        )

    def records_path(self) -> Path:
        return self.records or self.results_dir / "quality_records.jsonl"


SMOKE = {
    "samples": 480,
    "clients": 3,
    "rounds": 1,
    "central_epochs": 1,
    "batch_size": 64,
    "hidden_dim": 32,
    "seeds": [0],
    "rates": [0.0, 0.5],
    "alphas": [0.5],
    "workers": 2,
}


def plan_of(s: QualitySettings) -> SweepPlan:
    return SweepPlan(
        rates=tuple(s.rates),
        missingness=tuple(s.missingness),
        alphas=tuple(s.alphas),
        seeds=tuple(s.seeds),
        clients=s.clients,
        headline=s.headline(),
        headline_methods=(
            "ours",
            *BASELINES,
            *ABLATIONS,
            *VARIANTS,
            "central_paired",
            "ceiling_text",
            "ceiling_image",
            *FED_CEILINGS,
        ),
        sweep_methods=(
            "ours",
            *BASELINES,
            "ceiling_text",
            "ceiling_image",
            *FED_CEILINGS,
            *VARIANTS,
        ),
    )


def prepare_embeddings(s: QualitySettings) -> Path:
    """Path of the assembled embedding file workers read (encoding once if needed)."""
    if s.embeddings is not None:
        if not s.embeddings.is_file():
            raise QualityBenchmarkError(f"embeddings file not found: {s.embeddings}")
        return s.embeddings
    from crossfed.simulation.experiment import BuiltinSimData
    from crossfed.simulation.federation_data import load_data

    spec = BuiltinSimData(num_samples=s.samples, cache_dir=s.cache_dir)
    data = load_data(spec, s.progress).embeddings
    path = s.results_dir / ".cache" / f"quality-embeddings-{s.samples}.safetensors"
    data.save(path)
    return path


def _ms(d: dict[str, dict[str, MeanStd]]) -> dict[str, dict[str, dict[str, float]]]:
    return {c: {k: v.as_dict() for k, v in row.items()} for c, row in d.items()}


def coverage_line(rows: list[dict[str, Any]], seeds: int) -> str:
    """How complete the grid is (a sweep cut short by its deadline says so here)."""
    full = sum(len(r["seeds"]) == seeds for r in rows)
    partial = sum(0 < len(r["seeds"]) < seeds for r in rows)
    missing = sum(not r["seeds"] for r in rows)
    return (
        f"Grid coverage: {full} of {len(rows)} cells with all {seeds} seeds, {partial} with "
        f"fewer (see the seeds column), {missing} not run."
    )


def build_report(s: QualitySettings, records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown body and JSON document from the records on file."""
    h = s.headline()
    methods = tuple(plan_of(s).headline_methods)
    head_acc, used = summarise_point(
        records, h.missingness, h.rate, h.alpha, s.clients, s.seeds, methods
    )
    head_f1, _ = summarise_point(
        records, h.missingness, h.rate, h.alpha, s.clients, s.seeds, methods, "macro_f1"
    )
    rows = sweep_rows(records, s.missingness, s.alphas, s.rates, s.clients, s.seeds)
    targets = target_checks(head_acc, rows, VARIANTS)
    ours_dropout = TrainSection().ours_dropout
    lines = [
        "## Quality (federated, simulated)",
        "",
        *([s.note, ""] if s.note else []),
        (
            f"Federated simulation with `crossfed simulate`'s engine (the grid is one experiment "
            f"file per federation setup; virtual clients as Ray tasks): real `train_local` on "
            f"each client, the server's module-aware `StreamingFedAvg` (eq. 15) and "
            f"`ProjectionAggregator` (eq. 16, no DP noise), no gRPC. Built-in synthetic shapes, "
            f"{s.samples} samples encoded once with the default frozen encoders, "
            f"{s.test_fraction:.0%} held out (fully paired; Table I configurations hide a "
            f"modality at inference). {s.clients} clients, Dirichlet(α) label split; "
            f"{s.rounds} rounds × {s.local_epochs} local epoch(s), batch {s.batch_size}, lr "
            f"{s.lr:g}, hidden {s.hidden_dim}; modality dropout {s.dropout:g} for the dropout "
            f"baseline, {ours_dropout:g} for ours (see the method changes below); central "
            f"references {s.central_epochs} epochs. Seeds {s.seeds}."
        ),
        "",
        (
            f"### Headline: {h.missingness.replace('_', '-')} missingness, rate {h.rate:g}, "
            f"α {h.alpha:g}, {s.clients} clients, seeds used {used} (mean ± std)"
        ),
        "",
        *headline_table(head_acc, "accuracy"),
        "",
        *headline_table(head_f1, "macro-F1"),
        "",
        (
            "Best baseline = better of zero-fill and dropout FedAvg per seed and configuration; "
            "gap-closure = (ours − best) / (ceiling − best) per seed; ceiling = central "
            "classifier on every training sample holding the modality. Where ceiling − best "
            "is under a point, per-seed gap-closure divides by almost nothing and swings "
            "wildly (sweep table); read ours vs best there."
        ),
        "",
        "### Ablations at the headline setting (accuracy)",
        "",
        *ablation_table(head_acc, (*ABLATIONS, *VARIANTS)),
        "",
        *ablation_reading(head_acc, ABLATIONS),
        "",
        "### Sweep: ours vs best baseline vs ceiling (accuracy, mean over seeds)",
        "",
        coverage_line(rows, len(s.seeds)),
        "",
        *sweep_table(rows),
        "",
        "### Targets",
        "",
        *targets,
        "",
        METHOD_NOTES,
    ]
    doc = {
        "settings": s.model_dump(mode="json"),
        "simulator": {"backend": s.backend, "ray_address": s.ray_address},
        "headline": {
            "setup": {
                "missingness": h.missingness,
                "rate": h.rate,
                "alpha": h.alpha,
                "clients": s.clients,
            },
            "seeds_used": used,
            "accuracy": _ms(head_acc),
            "macro_f1": _ms(head_f1),
        },
        "sweep": rows,
        "targets": targets,
        "num_records": len(records),
    }
    return "\n".join(lines), doc


def parse(argv: list[str] | None) -> QualitySettings:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--profile", choices=["full", "smoke"], default="full")
    p.add_argument("--samples", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--central-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--rates", type=float, nargs="+")
    p.add_argument("--alphas", type=float, nargs="+")
    p.add_argument("--missingness", nargs="+")
    p.add_argument("--workers", type=int, help="(method, seed) runs driven at once")
    p.add_argument("--backend", choices=["ray", "inline"])
    p.add_argument("--ray-address", help="run on this Ray cluster instead of a local instance")
    p.add_argument("--deadline-s", type=float)
    p.add_argument("--embeddings", type=Path)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--results-dir", type=Path)
    p.add_argument("--records", type=Path)
    p.add_argument("--benchmarks-md", type=Path)
    p.add_argument("--report-only", action="store_true", default=None)
    p.add_argument("--note", help="run-specific remark for the report (how it was run)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if args.get("profile") == "smoke":
        args = {**SMOKE, **args}
    try:
        return QualitySettings(**args)
    except ValidationError as exc:
        raise QualityBenchmarkError(f"invalid settings: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    try:
        s = parse(argv)
        s.results_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if s.report_only:
            records = read_records(s.records_path())
            if not records:
                raise QualityBenchmarkError(f"no records in {s.records_path()}")
        else:
            embeddings = prepare_embeddings(s)
            records = run_jobs(
                plan_jobs(plan_of(s)),
                s.records_path(),
                s.grid(embeddings.resolve()),
                s.results_dir / ".cache" / "experiments",
                s.deadline_s,
                s.progress,
            )
        body, doc = build_report(s, records)
        doc["wall_s"] = time.perf_counter() - start
        plots = write_plots(doc["sweep"], s.results_dir)
        doc["plots"] = [str(p) for p in plots]
        (s.results_dir / "quality.json").write_text(json.dumps(doc, indent=2, allow_nan=True))
        write_section(s.benchmarks_md, body)
        print(body)
        return 0
    except (QualityBenchmarkError, SimulationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
