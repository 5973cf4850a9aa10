"""Turn sweep records into the quality report: per-seed summaries, mean +- std tables
(markdown), the JSON document, accuracy-vs-missing-rate plots and the Quality section of
BENCHMARKS.md (only the text between its own markers is replaced)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossfed.simulation.federation_data import FederationSetup
from crossfed.simulation.gap_closure import (
    CONFIGS,
    MISSING_CONFIGS,
    MeanStd,
    aggregate_seeds,
    seed_summary,
)
from crossfed.simulation.methods import ABLATIONS, FED_CEILINGS, FEDERATED_METHODS, VARIANTS
from quality.quality_errors import QualityBenchmarkError
from quality.sweep import canonical

SECTION_START = "<!-- quality:start -->"
SECTION_END = "<!-- quality:end -->"
REFERENCE_METHODS = ("zero_fill", "dropout", "ceiling_text", "ceiling_image")


def _index(records: Sequence[dict[str, Any]]) -> dict[tuple[str, FederationSetup], dict[str, Any]]:
    return {(r["method"], FederationSetup(**r["setup"])): r["scores"] for r in records}


def summarise_point(
    records: Sequence[dict[str, Any]],
    mode: str,
    rate: float,
    alpha: float,
    clients: int,
    seeds: Sequence[int],
    methods: Sequence[str],
    metric: str = "accuracy",
) -> tuple[dict[str, dict[str, MeanStd]], list[int]]:
    """Mean +- std over the seeds for which every needed run exists; returns the seeds used."""
    index = _index(records)
    per_seed, used = [], []
    for seed in seeds:
        setup = FederationSetup(mode, rate, alpha, clients, seed)  # type: ignore[arg-type]
        by_method = {}
        for m in methods:
            scores = index.get((m, canonical(setup, m)))
            if scores is not None:
                by_method[m] = scores
        if not all(m in by_method for m in ("ours", *REFERENCE_METHODS)):
            continue
        # older records lack them; variants run only where asked
        for optional in ("central_paired", *FED_CEILINGS, *VARIANTS):
            scores = index.get((optional, canonical(setup, optional)))
            if scores is not None:
                by_method[optional] = scores
        per_seed.append(seed_summary(by_method, metric))
        used.append(seed)
    return aggregate_seeds(per_seed), used


def _fmt(ms: MeanStd | None) -> str:
    return "n/a" if ms is None else ms.text()


def headline_table(agg: dict[str, dict[str, MeanStd]], metric: str) -> list[str]:
    head = (
        f"| configuration ({metric}) | ours | zero-fill FedAvg | dropout FedAvg | best baseline "
        "| unimodal ceiling (central) | federated unimodal ceiling | central paired "
        "| gap-closure | gap-closure vs federated ceiling |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for c in CONFIGS:
        row = agg.get(c, {})

        def missing_only(key: str, c: str = c, row: dict[str, MeanStd] = row) -> str:
            return _fmt(row.get(key)) if c != "both" else "—"

        lines.append(
            f"| {c} | {_fmt(row.get('ours'))} | {_fmt(row.get('zero_fill'))} | "
            f"{_fmt(row.get('dropout'))} | {_fmt(row.get('best_baseline'))} | "
            f"{missing_only('ceiling')} | {missing_only('fed_ceiling')} | "
            f"{_fmt(row.get('central_paired'))} | "
            f"{missing_only('gap_closure')} | {missing_only('fed_gap_closure')} |"
        )
    return lines


def ablation_table(agg: dict[str, dict[str, MeanStd]], ablations: Sequence[str]) -> list[str]:
    lines = [
        (
            "| method | what changes | text-only acc | gap-closure | image-only acc | gap-closure "
            "| both acc |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for m in ("ours", *ablations):
        t, i, b = agg.get("text_only", {}), agg.get("image_only", {}), agg.get("both", {})
        gk = "gap_closure" if m == "ours" else f"gap_closure:{m}"
        desc = FEDERATED_METHODS[m].description if m in FEDERATED_METHODS else m
        lines.append(
            f"| {m} | {desc} | {_fmt(t.get(m))} | {_fmt(t.get(gk))} | {_fmt(i.get(m))} | "
            f"{_fmt(i.get(gk))} | {_fmt(b.get(m))} |"
        )
    return lines


def ablation_reading(agg: dict[str, dict[str, MeanStd]], ablations: Sequence[str]) -> list[str]:
    """Per configuration, how much each component is worth: ours minus each ablation on the
    same seeds (mean accuracy points), largest first; <= 0 means it did not help here."""
    out = []
    for c in CONFIGS:
        row = agg.get(c, {})
        deltas = []
        for m in ablations:
            d = row.get(f"delta:{m}")
            if d is not None and d.n:
                deltas.append((d.mean, m, d.n))
        if not deltas:
            continue
        deltas.sort(reverse=True)
        parts = [f"{m} {d * 100:+.1f} ({n} seed{'s' if n > 1 else ''})" for d, m, n in deltas]
        out.append(f"- {c}: ours minus ablation, points: " + ", ".join(parts))
    return out


def sweep_rows(
    records: Sequence[dict[str, Any]],
    modes: Sequence[str],
    alphas: Sequence[float],
    rates: Sequence[float],
    clients: int,
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """One row per grid point with every number the sweep table and plots need."""
    rows = []
    for mode in modes:
        for alpha in alphas:
            for rate in rates:
                agg, used = summarise_point(
                    records, mode, rate, alpha, clients, seeds, ("ours", *REFERENCE_METHODS)
                )
                rows.append(
                    {
                        "missingness": mode,
                        "alpha": alpha,
                        "rate": rate,
                        "seeds": used,
                        "summary": {
                            c: {k: v.as_dict() for k, v in agg.get(c, {}).items()} for c in CONFIGS
                        },
                    }
                )
    return rows


def _m(row: dict[str, Any], c: str, k: str) -> MeanStd | None:
    d = row["summary"].get(c, {}).get(k)
    return None if d is None else MeanStd(d["mean"], d["std"], int(d["n"]))


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        (
            "| missingness | α | rate | seeds | text-only ours / best / fed. ceiling / ceiling "
            "| gap | image-only ours / best / fed. ceiling / ceiling | gap | both ours / best |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["seeds"]:
            lines.append(
                f"| {r['missingness']} | {r['alpha']:g} | {r['rate']:g} | 0 | not run | | | | |"
            )
            continue

        def trio(c: str, r: dict[str, Any] = r) -> str:
            vals = [_m(r, c, k) for k in ("ours", "best_baseline", "fed_ceiling", "ceiling")]
            return " / ".join("n/a" if v is None else f"{v.mean:.3f}" for v in vals)

        def gap(c: str, r: dict[str, Any] = r) -> str:
            return _fmt(_m(r, c, "gap_closure"))

        both = [_m(r, "both", k) for k in ("ours", "best_baseline")]
        lines.append(
            f"| {r['missingness']} | {r['alpha']:g} | {r['rate']:g} | {len(r['seeds'])} | "
            f"{trio('text_only')} | {gap('text_only')} | {trio('image_only')} | "
            f"{gap('image_only')} | "
            + " / ".join("n/a" if v is None else f"{v.mean:.3f}" for v in both)
            + " |"
        )
    return lines


def target_checks(
    headline: dict[str, dict[str, MeanStd]],
    rows: Sequence[dict[str, Any]],
    variants: Sequence[str] = (),
) -> list[str]:
    """The issue's targets, each marked met / NOT met from the numbers above; ``variants``
    (additions to ours that the deployed method lacks) get the headline check on its own line."""
    out = []
    for c in MISSING_CONFIGS:
        g = headline.get(c, {}).get("gap_closure")
        ok = g is not None and g.n > 0 and g.mean >= 0.7
        out.append(f"- headline gap-closure {c} >= 0.7: {'met' if ok else 'NOT met'} ({_fmt(g)})")
    for m in variants:
        gaps = ", ".join(
            f"{c} {_fmt(headline.get(c, {}).get(f'gap_closure:{m}'))}" for c in MISSING_CONFIGS
        )
        above = [
            o.mean > b.mean
            for r in rows
            if r["rate"] >= 0.3 and r["seeds"]
            for c in MISSING_CONFIGS
            if (o := _m(r, c, m)) is not None and (b := _m(r, c, "best_baseline")) is not None
        ]
        out.append(
            f"- variant {m} (not the deployed method): headline gap-closure {gaps}; above the "
            f"best baseline in {sum(above)}/{len(above)} grid cells with rate >= 0.3"
        )
    bad = []
    checked = 0
    for r in rows:
        if r["rate"] < 0.3 or not r["seeds"]:
            continue
        for c in MISSING_CONFIGS:
            o, b = _m(r, c, "ours"), _m(r, c, "best_baseline")
            if o is None or b is None:
                continue
            checked += 1
            if not o.mean > b.mean:
                bad.append(f"{r['missingness']} α={r['alpha']:g} rate={r['rate']:g} {c}")
    out.append(
        f"- ours above the best baseline on text-only and image-only at every rate >= 0.3: "
        f"{'met' if checked and not bad else 'NOT met'} ({checked - len(bad)}/{checked} cells"
        + (
            f"; below or equal: {', '.join(bad[:12])}{' …' if len(bad) > 12 else ''})"
            if bad
            else ")"
        )
    )
    both_o, both_b = (
        headline.get("both", {}).get("ours"),
        headline.get("both", {}).get("best_baseline"),
    )
    if both_o is not None and both_b is not None and both_o.n and both_b.n:
        diff = both_o.mean - both_b.mean
        out.append(
            f"- headline paired within 1 point of the best baseline or above: "
            f"{'met' if diff >= -0.01 else 'NOT met'} (ours − best = {diff * 100:+.1f} points)"
        )
    return out


def write_plots(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Accuracy vs missing rate, one PNG per (missingness, alpha), one panel per Table I
    configuration: ours, best baseline, federated and central unimodal ceilings and the
    variants where they ran (mean over seeds, std as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["seeds"]:
            groups[(r["missingness"], r["alpha"])].append(r)
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (mode, alpha), rs in sorted(groups.items()):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, c in zip(axes, CONFIGS):
            for key, label, style in (
                ("ours", "ours", "o-"),
                ("best_baseline", "best baseline", "s--"),
                ("fed_ceiling", "federated unimodal ceiling", "v-."),
                ("ceiling", "unimodal ceiling (central)", "^:"),
                *((m, f"{m} (opt-in)", "d:") for m in VARIANTS),
            ):
                pts: list[tuple[float, MeanStd]] = []
                for r in rs:
                    v = _m(r, c, key)
                    if v is not None and not math.isnan(v.mean):
                        pts.append((r["rate"], v))
                if pts:
                    ax.errorbar(
                        [x for x, _ in pts],
                        [v.mean for _, v in pts],
                        yerr=[v.std for _, v in pts],
                        fmt=style,
                        label=label,
                        capsize=3,
                    )
            ax.set_title(c)
            ax.set_xlabel("missing rate")
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{mode} missingness, Dirichlet α={alpha:g}")
        fig.tight_layout()
        path = out_dir / f"quality_{mode}_alpha{alpha:g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_section(
    benchmarks_md: Path,
    body: str,
    start: str = SECTION_START,
    end: str = SECTION_END,
    after: str | None = None,
) -> None:
    """Replace the text between the ``start``/``end`` markers (absent: insert the section
    after the marker ``after`` when the file has it, else append it); every other section of
    the file is kept byte for byte."""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if not benchmarks_md.exists():
        benchmarks_md.write_text(f"# Benchmarks\n\n{block}\n")
        return
    text = benchmarks_md.read_text()
    starts, ends = text.count(start), text.count(end)
    if starts == 0 and ends == 0:
        if after is not None and text.count(after) == 1:
            head, tail = text.split(after, 1)
            benchmarks_md.write_text(f"{head}{after}\n\n{block}{tail}")
            return
        benchmarks_md.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    if starts != 1 or ends != 1 or text.index(start) > text.index(end):
        raise QualityBenchmarkError(
            f"{benchmarks_md}: expected one {start} before one {end}, found "
            f"{starts} start and {ends} end markers; fix the file by hand"
        )
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    benchmarks_md.write_text(head + block + tail)


__all__ = [
    "ABLATIONS",
    "SECTION_END",
    "SECTION_START",
    "ablation_table",
    "headline_table",
    "summarise_point",
    "sweep_rows",
    "sweep_table",
    "target_checks",
    "write_plots",
    "write_section",
]
