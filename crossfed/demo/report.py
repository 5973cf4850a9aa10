"""The demo's outputs: a terminal table, report.md and accuracy.png (accuracy per round per
Table I configuration) in the run folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossfed.demo.run import DemoResult

LABELS = {"both": "both present", "text_only": "text only", "image_only": "image only"}


def _round_label(result: DemoResult, index: int) -> str:
    """The round number; the one after the last training round is the calibration round."""
    rnd = result.rounds[index].round
    return f"{rnd} (calibration)" if rnd > result.options.rounds else str(rnd)


def _final_rows(result: DemoResult) -> list[tuple[str, float, float]]:
    if not result.rounds:
        return []
    last = result.rounds[-1].scores
    return [(LABELS[c], last[c]["accuracy"], last[c]["macro_f1"]) for c in LABELS if c in last]


def summary_table(result: DemoResult) -> str:
    """Final held-out accuracy per Table I configuration, as a markdown table."""
    lines = [
        f"Held-out accuracy of the global model after round {_round_label(result, -1)}"
        if result.rounds
        else "No round was committed.",
        "",
        "| inference configuration | accuracy | macro-F1 |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {acc:.3f} | {f1:.3f} |" for name, acc, f1 in _final_rows(result)]
    return "\n".join(lines)


def _plot(result: DemoResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r.round for r in result.rounds]
    for config, label in LABELS.items():
        ax.plot(
            rounds, [r.scores[config]["accuracy"] for r in result.rounds], marker="o", label=label
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("crossfed demo: global model per Table I configuration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(result.run_dir / "accuracy.png", dpi=120)
    plt.close(fig)


def write_report(result: DemoResult) -> None:
    """report.md + accuracy.png into the run folder."""
    opts = result.options
    per_round = [
        "| round | uploads | both | text only | image only |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    per_round += [
        f"| {_round_label(result, i)} | {r.uploads} | {r.scores['both']['accuracy']:.3f} | "
        f"{r.scores['text_only']['accuracy']:.3f} | {r.scores['image_only']['accuracy']:.3f} |"
        for i, r in enumerate(result.rounds)
    ]
    clients = "\n".join(
        f"- `{name}`: {modality}" for name, modality in result.client_modalities.items()
    )
    text = f"""# crossfed demo run

Run folder: `{result.run_dir}` — final state **{result.final_state or "unfinished"}**,
wall time {result.wall_s:.1f} s.

Setting: built-in synthetic shapes dataset ({opts.samples} samples split over {opts.clients}
clients by Dirichlet(alpha={opts.alpha}), seed {opts.seed}); missingness **per client**
(each client holds one Table I configuration); {opts.rounds} rounds, {opts.epochs} local
epochs; TLS gRPC on loopback, encrypted uploads, DP-noised projection exchange.
Held-out test set: {opts.test_samples} fresh paired samples; "text only" hides the image and
recovers it (diffusion), "image only" hides the text and recovers it (mapper).

Clients:
{clients}

{summary_table(result)}

![accuracy per round](accuracy.png)

Per round:

{chr(10).join(per_round)}
"""
    (result.run_dir / "report.md").write_text(text)
    if result.rounds:
        _plot(result)
