"""Tables and plots of the quality suite's extra axes (issue 18): strategies at per-client
missingness (gap to the central unimodal ceiling closed, relative to FedAvg), robustness to
byzantine clients, and training budgets (accuracy against wall time) per dataset. Records are
`quality.sweep` JSON lines; every figure is a mean ± std over the seeds that ran."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossfed.simulation.federation_data import FederationSetup
from crossfed.simulation.gap_closure import CONFIGS, MeanStd
from quality.axes_plan import CENTRAL_REFERENCES, variant_label
from quality.sweep import RunVariant, canonical

AXES_START = "<!-- quality-axes:start -->"
AXES_END = "<!-- quality-axes:end -->"
CEILING_OF = {"text_only": "ceiling_text", "image_only": "ceiling_image"}


def _acc(record: dict[str, Any], config: str) -> float:
    value = record["scores"].get(config, {}).get("accuracy", math.nan)
    return math.nan if value is None else float(value)


def _setup(record: dict[str, Any]) -> FederationSetup:
    return FederationSetup(**record["setup"])


def _cell(setup: FederationSetup) -> tuple[str, float, float]:
    return (setup.missingness, setup.rate, setup.alpha)


def _cell_name(cell: tuple[str, float, float]) -> str:
    mode, rate, alpha = cell
    return f"{mode.replace('_', '-')} {rate:g} / α {alpha:g}"


def _pts(ms: MeanStd) -> str:
    return "n/a" if ms.n == 0 else f"{ms.mean * 100:+.1f} ± {ms.std * 100:.1f}"


# -- strategies ---------------------------------------------------------------------------


def strategy_summary(
    records: Sequence[dict[str, Any]],
) -> dict[tuple[str, float, float], dict[str, dict[str, Any]]]:
    """Per cell and strategy label: accuracy per configuration (mean ± std), the change
    against FedAvg on the same seeds (points) and the share of FedAvg's gap to the central
    ceiling it closes: (acc − fedavg) / (ceiling − fedavg) per seed."""
    ours: dict[tuple[Any, ...], dict[str, float]] = {}
    refs: dict[tuple[Any, ...], dict[str, float]] = {}
    labels: list[str] = []
    for r in records:
        setup = _setup(r)
        if r["method"] in CENTRAL_REFERENCES:
            refs[(r["method"], setup)] = {c: _acc(r, c) for c in CONFIGS}
        elif r["method"] == "ours":
            label = variant_label(RunVariant.of(r))
            if label not in labels:
                labels.append(label)
            ours[(label, _cell(setup), setup.seed)] = {c: _acc(r, c) for c in CONFIGS}
    out: dict[tuple[str, float, float], dict[str, dict[str, Any]]] = defaultdict(dict)
    cells = sorted({k[1] for k in ours}, key=lambda c: (c[0] != "per_client", c[1], c[2]))
    for cell in cells:
        for label in labels:
            seeds = sorted(s for (lab, c, s) in ours if lab == label and c == cell)
            if not seeds:
                continue
            row: dict[str, Any] = {"seeds": seeds}
            for c in CONFIGS:
                row[c] = MeanStd.of(ours[(label, cell, s)][c] for s in seeds)
                deltas, closures = [], []
                for s in seeds:
                    base = ours.get(("fedavg", cell, s))
                    if base is None:
                        continue
                    deltas.append(ours[(label, cell, s)][c] - base[c])
                    if c in CEILING_OF:
                        setup = FederationSetup(cell[0], cell[1], cell[2], 0, s)  # type: ignore[arg-type]
                        ref = _ref(refs, CEILING_OF[c], setup)
                        if ref is not None and abs(ref[c] - base[c]) > 1e-9:
                            closures.append(
                                (ours[(label, cell, s)][c] - base[c]) / (ref[c] - base[c])
                            )
                row[f"delta:{c}"] = MeanStd.of(deltas)
                if c in CEILING_OF:
                    row[f"closure:{c}"] = MeanStd.of(closures)
                    ceil = [
                        _ref(refs, CEILING_OF[c], FederationSetup(cell[0], cell[1], cell[2], 0, s))
                        for s in seeds
                    ]  # type: ignore[arg-type]
                    row[f"ceiling:{c}"] = MeanStd.of(x[c] for x in ceil if x is not None)
            out[cell][label] = row
    return dict(out)


def _ref(
    refs: dict[tuple[Any, ...], dict[str, float]], method: str, setup: FederationSetup
) -> dict[str, float] | None:
    """A central reference's scores for the setup (any client count: they do not depend on it)."""
    want = canonical(setup, method)
    for (m, s), scores in refs.items():
        if m == method and (s.missingness, s.rate, s.alpha, s.seed) == (
            want.missingness,
            want.rate,
            want.alpha,
            want.seed,
        ):
            return scores
    return None


def strategy_table(summary: dict[tuple[str, float, float], dict[str, dict[str, Any]]]) -> list[str]:
    lines = [
        (
            "| cell (missingness rate / α) | strategy | seeds | text-only | image-only | both "
            "| Δ text / image / both vs FedAvg (points) | gap to central ceiling closed, text "
            "/ image |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell, by_label in summary.items():
        for label, row in by_label.items():
            deltas = " / ".join(_pts(row[f"delta:{c}"]) for c in CONFIGS)
            closure = " / ".join(
                "n/a" if row[f"closure:{c}"].n == 0 else row[f"closure:{c}"].text(2)
                for c in CEILING_OF
            )
            lines.append(
                f"| {_cell_name(cell)} | {label} | {len(row['seeds'])} | "
                f"{row['text_only'].text()} | {row['image_only'].text()} | {row['both'].text()} | "
                f"{deltas if label != 'fedavg' else '—'} | {closure if label != 'fedavg' else '—'} |"
            )
    return lines


def ceiling_lines(summary: dict[tuple[str, float, float], dict[str, dict[str, Any]]]) -> list[str]:
    out = []
    for cell, by_label in summary.items():
        row = by_label.get("fedavg")
        if row is None:
            continue
        t, i = row["ceiling:text_only"], row["ceiling:image_only"]
        out.append(
            f"- {_cell_name(cell)}: central ceilings text {t.text()}, image {i.text()}; "
            f"ours with FedAvg {row['text_only'].text()} / {row['image_only'].text()}"
        )
    return out


def strategy_targets(
    summary: dict[tuple[str, float, float], dict[str, dict[str, Any]]],
) -> list[str]:
    """Issue 18's targets per strategy: at per-client cells, close >= half of FedAvg's gap to
    the central ceiling on text-only and image-only and lift paired accuracy; nowhere (the
    headline cell included) lose more than 0.5 points against FedAvg."""
    labels = {label for by_label in summary.values() for label in by_label} - {"fedavg"}
    out = []
    for label in sorted(labels):
        closures: dict[str, list[float]] = {c: [] for c in CEILING_OF}
        paired, worst = [], math.inf
        where = ""
        for cell, by_label in summary.items():
            row = by_label.get(label)
            if row is None:
                continue
            for c in CONFIGS:
                d = row[f"delta:{c}"]
                if d.n and d.mean < worst:
                    worst, where = d.mean, f"{_cell_name(cell)} {c}"
            if cell[0] == "per_client":
                for c in CEILING_OF:
                    if row[f"closure:{c}"].n:
                        closures[c].append(row[f"closure:{c}"].mean)
                if row["delta:both"].n:
                    paired.append(row["delta:both"].mean)
        parts = []
        for c in CEILING_OF:
            vals = closures[c]
            mean = sum(vals) / len(vals) if vals else math.nan
            parts.append(f"{c} closure {mean:.2f} ({'met' if mean >= 0.5 - 1e-9 else 'NOT met'})")
        lift = sum(paired) / len(paired) if paired else math.nan
        parts.append(f"paired {lift * 100:+.1f} points ({'met' if lift > 0 else 'NOT met'})")
        if worst < math.inf:
            verdict = "met" if worst >= -0.005 else "NOT met"
            parts.append(f"worst cell {worst * 100:+.1f} points at {where} ({verdict})")
        out.append(f"- {label}: " + "; ".join(parts))
    return out


# -- attacks ------------------------------------------------------------------------------


def attack_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """strategy -> attack ("none", "scale", ...) -> accuracy per configuration and the change
    against the same strategy's clean run and against FedAvg's clean run, same seeds."""
    runs: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in records:
        if r["method"] != "ours":
            continue
        v = RunVariant.of(r)
        attack = v.attack if v.attack == "none" else f"{v.attack} ×{v.attackers}"
        runs[(variant_label(v), attack, _setup(r).seed)] = {c: _acc(r, c) for c in CONFIGS}
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    strategies = list(dict.fromkeys(k[0] for k in runs))
    attacks = list(dict.fromkeys(k[1] for k in runs))
    for strat in strategies:
        for attack in attacks:
            seeds = sorted(s for (st, a, s) in runs if st == strat and a == attack)
            if not seeds:
                continue
            row: dict[str, Any] = {"seeds": seeds}
            for c in CONFIGS:
                row[c] = MeanStd.of(runs[(strat, attack, s)][c] for s in seeds)
                own = [
                    runs[(strat, attack, s)][c] - runs[(strat, "none", s)][c]
                    for s in seeds
                    if (strat, "none", s) in runs
                ]
                avg = [
                    runs[(strat, attack, s)][c] - runs[("fedavg", "none", s)][c]
                    for s in seeds
                    if ("fedavg", "none", s) in runs
                ]
                row[f"vs_clean:{c}"] = MeanStd.of(own)
                row[f"vs_fedavg:{c}"] = MeanStd.of(avg)
            out[strat][attack] = row
    return dict(out)


def attack_table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = [
        (
            "| strategy | attack | seeds | text-only | image-only | both | Δ vs own clean run, "
            "text / image / both (points) | Δ vs clean FedAvg (points) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for strat, by_attack in summary.items():
        for attack, row in by_attack.items():
            own = " / ".join(_pts(row[f"vs_clean:{c}"]) for c in CONFIGS)
            avg = " / ".join(_pts(row[f"vs_fedavg:{c}"]) for c in CONFIGS)
            lines.append(
                f"| {strat} | {attack} | {len(row['seeds'])} | {row['text_only'].text()} | "
                f"{row['image_only'].text()} | {row['both'].text()} | "
                f"{own if attack != 'none' else '—'} | {avg} |"
            )
    return lines


def attack_targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Within 2 points of the clean run (its own, and FedAvg's) on every configuration."""
    out = []
    for strat, by_attack in summary.items():
        for attack, row in by_attack.items():
            if attack == "none":
                continue
            worst_own = min(
                (row[f"vs_clean:{c}"].mean for c in CONFIGS if row[f"vs_clean:{c}"].n),
                default=math.nan,
            )
            worst_avg = min(
                (row[f"vs_fedavg:{c}"].mean for c in CONFIGS if row[f"vs_fedavg:{c}"].n),
                default=math.nan,
            )
            verdict = "met" if worst_avg >= -0.02 else "NOT met"
            out.append(
                f"- {strat} under {attack}: worst configuration {worst_own * 100:+.1f} points vs its "
                f"clean run, {worst_avg * 100:+.1f} vs clean FedAvg (within 2 points: {verdict})"
            )
    return out


# -- defaults -----------------------------------------------------------------------------


def defaults_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, rounds, epochs, lr): accuracy per configuration, their mean (also per
    seed, for paired comparisons), seconds."""
    groups: dict[tuple[str, int, int, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["method"] != "ours":
            continue
        v = RunVariant.of(r)
        if v.rounds is None or v.local_epochs is None or v.lr is None:
            continue
        groups[(r.get("dataset", "builtin"), v.rounds, v.local_epochs, v.lr)].append(r)
    rows = []
    for (dataset, rounds, epochs, lr), rs in sorted(groups.items()):
        per_seed = {_setup(r).seed: sum(_acc(r, c) for c in CONFIGS) / len(CONFIGS) for r in rs}
        row: dict[str, Any] = {
            "dataset": dataset,
            "rounds": rounds,
            "local_epochs": epochs,
            "lr": lr,
            "seeds": sorted(per_seed),
            "seconds": MeanStd.of(float(r["seconds"]) for r in rs),
            "mean": MeanStd.of(per_seed.values()),
            "mean_by_seed": per_seed,
        }
        for c in CONFIGS:
            row[c] = MeanStd.of(_acc(r, c) for r in rs)
        rows.append(row)
    return rows


def _paired(a: dict[str, Any], b: dict[str, Any]) -> MeanStd:
    """a − b in mean accuracy over the seeds both ran."""
    common = sorted(set(a["mean_by_seed"]) & set(b["mean_by_seed"]))
    return MeanStd.of(a["mean_by_seed"][s] - b["mean_by_seed"][s] for s in common)


def defaults_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        (
            "| dataset | rounds | local epochs | lr | seeds | text-only | image-only | both "
            "| mean of the three | wall s per run |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['rounds']} | {r['local_epochs']} | {r['lr']:g} | "
            f"{len(r['seeds'])} | {r['text_only'].text()} | {r['image_only'].text()} | "
            f"{r['both'].text()} | {r['mean'].text()} | {r['seconds'].mean:.0f} |"
        )
    return lines


def defaults_reading(rows: Sequence[dict[str, Any]], current: tuple[int, int, float]) -> list[str]:
    """Per dataset: every budget against the current default ``current`` (rounds, epochs,
    lr) on the seeds both ran (paired, mean accuracy points), the best by that among budgets
    with >= 2 shared seeds, and the cheapest within max(its std, 0.5 points) of the best."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset and r["mean"].n]
        cur = next((r for r in rs if (r["rounds"], r["local_epochs"], r["lr"]) == current), None)
        if not rs or cur is None:
            continue

        def name(r: dict[str, Any]) -> str:
            return f"{r['rounds']} rounds × {r['local_epochs']} epochs, lr {r['lr']:g}"

        gains = {id(r): _paired(r, cur) for r in rs}
        # a budget a single seed ran is listed in the table, not picked as the best
        enough = min(2, max(g.n for g in gains.values()))
        rs = [r for r in rs if gains[id(r)].n >= enough]
        best = max(rs, key=lambda r: gains[id(r)].mean)
        g = gains[id(best)]
        near = [r for r in rs if gains[id(r)].n and gains[id(r)].mean >= g.mean - max(g.std, 0.005)]
        cheap = min(near, key=lambda r: r["seconds"].mean)
        c = gains[id(cheap)]
        out.append(
            f"- {dataset} (vs the current {name(cur)}, {cur['seconds'].mean:.0f} s/run; "
            f"paired over shared seeds, mean-accuracy points): best {name(best)} "
            f"{g.mean * 100:+.1f} ± {g.std * 100:.1f} ({g.n} seeds, "
            f"{best['seconds'].mean:.0f} s/run); cheapest within max(std, 0.5 points) of it: "
            f"{name(cheap)} {c.mean * 100:+.1f} ± {c.std * 100:.1f} ({c.n} seeds, "
            f"{cheap['seconds'].mean:.0f} s/run)"
        )
    return out


def central_references(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per dataset: the central references' accuracy (mean ± std over seeds), for scale."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["method"] in ("central_paired", *CENTRAL_REFERENCES):
            by[(r.get("dataset", "builtin"), r["method"])].append(r)
    out = []
    for dataset in dict.fromkeys(d for d, _ in by):
        parts = []
        for method, config in (
            ("central_paired", "both"),
            ("ceiling_text", "text_only"),
            ("ceiling_image", "image_only"),
        ):
            rs = by.get((dataset, method), [])
            if rs:
                ms = MeanStd.of(_acc(r, config) for r in rs)
                parts.append(f"{method} {config} {ms.text()}")
        out.append(f"- {dataset}, central references (10 epochs): " + ", ".join(parts))
    return out


# -- plots --------------------------------------------------------------------------------


def plot_strategies(
    summary: dict[tuple[str, float, float], dict[str, dict[str, Any]]], path: Path
) -> Path | None:
    """Accuracy per cell, one line per strategy, one panel per Table I configuration."""
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary)
    labels = list(dict.fromkeys(lab for by in summary.values() for lab in by))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, c in zip(axes, CONFIGS, strict=True):
        for k, label in enumerate(labels):
            xs, ys, es = [], [], []
            for x, cell in enumerate(cells):
                row = summary[cell].get(label)
                if row is not None and row[c].n:
                    xs.append(x + (k - len(labels) / 2) * 0.06)
                    ys.append(row[c].mean)
                    es.append(row[c].std)
            ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=2, label=label, ms=4)
        if c in CEILING_OF:
            ceil = [summary[cell].get("fedavg", {}).get(f"ceiling:{c}") for cell in cells]
            ax.plot(
                range(len(cells)),
                [m.mean if m is not None and m.n else math.nan for m in ceil],
                "k:",
                label="central ceiling",
            )
        ax.set_xticks(
            range(len(cells)), [_cell_name(cell) for cell in cells], rotation=30, fontsize=7
        )
        ax.set_title(c)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("ours under each server strategy (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_defaults(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Mean accuracy (of the three configurations) against wall seconds per run, per dataset."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in rows:
            if r["dataset"] != dataset:
                continue
            marker = {1e-3: "v", 2e-3: "o", 5e-3: "^"}.get(r["lr"], "s")
            ax.errorbar(
                r["seconds"].mean,
                r["mean"].mean,
                yerr=r["mean"].std,
                fmt=marker,
                capsize=2,
                color=f"C{[1, 2, 5].index(r['local_epochs']) if r['local_epochs'] in (1, 2, 5) else 3}",
            )
            ax.annotate(
                f"{r['rounds']}r×{r['local_epochs']}e lr{r['lr']:g}",
                (r["seconds"].mean, r["mean"].mean),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        ax.set_title(f"{dataset}: accuracy vs wall time (ours, FedAvg)")
        ax.set_xlabel("wall seconds per run (2 shared cores)")
        ax.set_ylabel("mean accuracy over text-only / image-only / both")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
