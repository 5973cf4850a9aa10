"""What `crossfed simulate` leaves behind: ``result.json`` (the experiment, its federations,
every run's per-round scores and timings, the mean +- std summary with best baseline,
ceiling and gap-closure), ``accuracy.png`` (global accuracy per round, one panel per Table I
configuration) and ``report.md`` (the summary table, with the setup it was measured on)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from crossfed.common.model.evaluation import CONFIGURATIONS
from crossfed.simulation.experiment_run import ExperimentResult
from crossfed.simulation.federation_run import RunRecord
from crossfed.simulation.gap_closure import MeanStd, aggregate_seeds, seed_summary

SUMMARY_KEYS = ("best_baseline", "ceiling", "gap_closure")
_NONE = MeanStd(math.nan, math.nan, 0)


def summary(result: ExperimentResult, metric: str = "accuracy") -> dict[str, dict[str, MeanStd]]:
    """Mean +- std over seeds per configuration: every method, and where the experiment ran
    them, best baseline, unimodal ceiling and gap-closure (design card)."""
    by_seed: dict[int, dict[str, Any]] = defaultdict(dict)
    for run in result.runs:
        by_seed[run.seed][run.method] = run.scores
    return aggregate_seeds([seed_summary(runs, metric) for runs in by_seed.values()])


def setup_line(result: ExperimentResult) -> str:
    """Missingness, rate, alpha, clients, seeds, rounds: stated with every result."""
    cfg = result.config
    fed, rounds = cfg.federation, cfg.rounds
    data = cfg.data
    source = data.kind if data.kind == "builtin" else f"{data.kind} {getattr(data, 'path', '')}"
    return (
        f"{source}; {fed.missing.mode.replace('_', '-')} missingness rate {fed.missing.rate:g}, "
        f"Dirichlet α {fed.dirichlet_alpha:g}, {fed.clients} clients, "
        f"{rounds.fraction:.0%} sampled per round, {rounds.rounds} rounds × "
        f"{cfg.train.local_epochs} local epoch(s), strategy {cfg.strategy.name}, "
        f"seeds {list(cfg.seeds)}"
    )


def markdown(result: ExperimentResult) -> str:
    """The report: setup, the accuracy and macro-F1 tables (mean ± std over seeds), timing."""
    lines = [f"# Simulation `{result.config.name}`", "", setup_line(result), ""]
    for metric in ("accuracy", "macro_f1"):
        agg = summary(result, metric)
        methods = list(dict.fromkeys(r.method for r in result.runs))
        extra = [
            k for k in SUMMARY_KEYS if any(agg.get(c, {}).get(k, _NONE).n for c in CONFIGURATIONS)
        ]
        columns = [*methods, *extra]
        lines += [
            f"| configuration ({metric}) | "
            + " | ".join(c.replace("_", " ") for c in columns)
            + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for c in CONFIGURATIONS:
            row = agg.get(c, {})
            cells = [row[k].text() if k in row else "—" for k in columns]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    ex = result.execution
    rounds = [r for run in result.runs for r in run.rounds]
    per_round = sum(r.seconds for r in rounds) / len(rounds) if rounds else math.nan
    lines += [
        (
            f"Ran on {ex['backend']} ({ex['nodes']} node(s), {ex['cluster_cpus']:g} CPUs, "
            f"{ex['slots']} client slots): {result.wall_seconds:.1f} s wall, data "
            f"{result.data_seconds:.1f} s, {per_round:.2f} s per round on average."
        ),
        "",
        (
            "Gap-closure = (ours − best baseline) / (unimodal ceiling − best baseline), per "
            "seed; best baseline = the better of zero-fill and dropout FedAvg."
        ),
    ]
    return "\n".join(lines) + "\n"


def _run_document(run: RunRecord) -> dict[str, Any]:
    return {
        "method": run.method,
        "seed": run.seed,
        "scores": run.scores,
        "seconds": run.seconds,
        "calibration": run.calibration,
        "notes": run.notes,
        "rounds": [
            {
                "round": r.round,
                "sampled": r.sampled,
                "reported": r.reported,
                "failed": r.failed,
                "seconds": r.seconds,
                "client_seconds_max": r.client_seconds_max,
                "worker_peak_rss_mib": r.worker_peak_rss_mib,
                "worker_private_mib": r.worker_private_mib,
                "client_state_mib": r.client_state_mib,
                "scores": r.scores,
            }
            for r in run.rounds
        ],
    }


def document(result: ExperimentResult) -> dict[str, Any]:
    """The JSON document of a finished experiment."""
    return {
        "experiment": result.config.model_dump(mode="json"),
        "setup": setup_line(result),
        "class_names": list(result.class_names),
        "federations": {
            str(seed): {
                "client_sizes": f.client_sizes,
                "client_modalities": f.client_modalities,
            }
            for seed, f in result.federations.items()
        },
        "execution": result.execution,
        "wall_seconds": result.wall_seconds,
        "data_seconds": result.data_seconds,
        "runs": [_run_document(r) for r in result.runs],
        "summary": {
            metric: {
                c: {k: v.as_dict() for k, v in row.items()}
                for c, row in summary(result, metric).items()
            }
            for metric in ("accuracy", "macro_f1")
        },
    }


def write_accuracy_plot(result: ExperimentResult, path: Path) -> Path | None:
    """Global accuracy per round, one panel per Table I configuration, one line per
    federated method (mean over seeds); None when no round was scored."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for run in result.runs:
        for r in run.rounds:
            if r.scores is not None:
                for c in CONFIGURATIONS:
                    value = r.scores[c]["accuracy"]
                    if math.isfinite(value):
                        curves[c][run.method][r.round].append(value)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, c in zip(axes, CONFIGURATIONS, strict=True):
        for method, points in curves.get(c, {}).items():
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], "o-", label=method)
        ax.set_title(c.replace("_", " "))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(setup_line(result), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: ExperimentResult, out_dir: Path) -> list[Path]:
    """result.json, report.md and accuracy.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "result.json"
    json_path.write_text(json.dumps(document(result), indent=2, allow_nan=True))
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(result))
    written = [json_path, md_path]
    plot = write_accuracy_plot(result, out_dir / "accuracy.png")
    if plot is not None:
        written.append(plot)
    return written
