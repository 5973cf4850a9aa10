"""`crossfed evaluate BUNDLE DATA` and `crossfed predict BUNDLE DATA --out predictions.csv`:
a trained federation's model bundle on a user's own manifest. Thin: the work is in
crossfed/bundle_inference.py. Every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from crossfed.bundle_inference import BundleEncoders
    from crossfed.common.model.model_bundle import ModelBundle

EXIT_BAD_INPUT = 2

BundleArg = Annotated[
    Path,
    typer.Argument(
        help="Model bundle (crossfed admin export-model, or the server's "
        "state/checkpoints/bundle-*.safetensors)."
    ),
]
DataArg = Annotated[
    Path, typer.Argument(help="CSV or JSONL manifest: columns image (path), text, label.")
]
TextEncoderOpt = Annotated[
    str | None,
    typer.Option("--text-encoder", help="Text encoder (default: the bundle's; same weights)."),
]
ImageEncoderOpt = Annotated[
    str | None,
    typer.Option("--image-encoder", help="Image encoder (default: the bundle's; same weights)."),
]
CacheOpt = Annotated[
    Path, typer.Option("--cache-dir", help="Embedding cache (shared with the client daemon).")
]
SkipOpt = Annotated[
    bool, typer.Option("--skip-bad-rows", help="Skip rows that cannot be used (counted).")
]
ProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]


def _fail(command: str, message: str) -> NoReturn:
    typer.echo(f"crossfed {command}: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextmanager
def _one_line_errors(command: str) -> Iterator[None]:
    """Turn the errors bad input raises into one line and exit code 2."""
    from crossfed.common.data.data_errors import DataError
    from crossfed.common.model.encoder_identity import EncoderMismatchError
    from crossfed.common.model.model_errors import ModelError

    try:
        yield
    except (DataError, ModelError, EncoderMismatchError) as exc:
        _fail(command, str(exc))
    except OSError as exc:
        _fail(command, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _prepare(
    command: str, bundle_path: Path, text: str | None, image: str | None
) -> tuple[ModelBundle, BundleEncoders]:
    """Load the bundle and rebuild its encoders (checked against its weights)."""
    from transformers.utils import logging as hf_logging

    from crossfed.bundle_inference import BundleEncoders
    from crossfed.common.model.model_bundle import load_bundle

    hf_logging.disable_progress_bar()
    bundle = load_bundle(bundle_path)
    encoders = BundleEncoders.for_bundle(bundle, text, image)
    for note in encoders.notes:
        typer.echo(f"crossfed {command}: note: {note}", err=True)
    return bundle, encoders


def evaluate_command(
    bundle_path: BundleArg,
    data: DataArg,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report-dir",
            help="Write report.md, evaluation.json and confusion.png here (default: "
            "evaluation-<data name>/ beside the working directory).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    text_encoder: TextEncoderOpt = None,
    image_encoder: ImageEncoderOpt = None,
    cache_dir: CacheOpt = Path(".crossfed-cache"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 1024,
    skip_bad_rows: SkipOpt = False,
    no_progress: ProgressOpt = False,
) -> None:
    """Accuracy and macro-F1 of a model bundle per Table I configuration (both / text only /
    image only on the rows holding both, with the other modality hidden) and on every row
    as it comes; confusion matrices as a PNG."""
    from crossfed.bundle_inference import (
        count_rows,
        evaluate_manifest,
        plot_confusions,
        report_markdown,
    )
    from crossfed.common.data.embedding_cache import EmbeddingCache
    from crossfed.common.data.progress_display import make_progress

    with _one_line_errors("evaluate"):
        bundle, encoders = _prepare("evaluate", bundle_path, text_encoder, image_encoder)
        out_dir = report_dir or Path(f"evaluation-{data.stem}")
        with make_progress(not no_progress) as bar:
            task = bar.add_task("evaluating rows", total=count_rows(data))
            result = evaluate_manifest(
                bundle,
                str(bundle_path),
                data,
                encoders,
                cache=EmbeddingCache(cache_dir),
                batch_size=batch_size,
                skip_bad_rows=skip_bad_rows,
                on_rows=lambda n: bar.advance(task, n),
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "evaluation.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (out_dir / "report.md").write_text(report_markdown(result))
        plot_confusions(result, out_dir / "confusion.png")
    if result.skipped:
        lines = ", ".join(str(i.line) for i in result.skipped[:5])
        typer.echo(
            f"crossfed evaluate: skipped {len(result.skipped)} of {result.rows_read} rows "
            f"(lines {lines}{', ...' if len(result.skipped) > 5 else ''}); first: "
            f"{result.skipped[0]}",
            err=True,
        )
    if json_output:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    typer.echo(f"{bundle.describe()}; {data}: {result.rows_read} rows")
    typer.echo(f"{'configuration':<14} {'rows':>7} {'accuracy':>9} {'macro-F1':>9}")
    for name, score in result.scores.items():
        if score["rows"]:
            typer.echo(
                f"{name:<14} {score['rows']:>7} {score['accuracy']:>9.3f} {score['macro_f1']:>9.3f}"
            )
        else:
            typer.echo(f"{name:<14} {0:>7} {'-':>9} {'-':>9}")
    typer.echo(f"report: {out_dir / 'report.md'} (confusion matrices: {out_dir / 'confusion.png'})")


def predict_command(
    bundle_path: BundleArg,
    data: DataArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output CSV (one row per input row).")
    ] = Path("predictions.csv"),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing --out file.")
    ] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes listed per row.")] = 3,
    text_encoder: TextEncoderOpt = None,
    image_encoder: ImageEncoderOpt = None,
    cache_dir: CacheOpt = Path(".crossfed-cache"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 512,
    skip_bad_rows: SkipOpt = False,
    no_progress: ProgressOpt = False,
) -> None:
    """Predict a class for every row of a manifest (labels optional; rows may miss either
    modality): predicted class, its probability, the top-k and which Table I path served it."""
    from crossfed.bundle_inference import count_rows, predict_manifest
    from crossfed.common.atomic_files import atomic_output
    from crossfed.common.data.embedding_cache import EmbeddingCache
    from crossfed.common.data.progress_display import make_progress

    if out.exists() and not force:
        _fail("predict", f"{out} already exists; pass --force to overwrite it")
    if out.exists() and not out.is_file():
        _fail("predict", f"{out} is not a regular file; refusing to overwrite it")
    if not out.parent.is_dir():
        _fail("predict", f"directory {out.parent} does not exist")
    with _one_line_errors("predict"):
        bundle, encoders = _prepare("predict", bundle_path, text_encoder, image_encoder)
        with atomic_output(out, text=True) as handle, make_progress(not no_progress) as bar:
            task = bar.add_task("predicting rows", total=count_rows(data))
            counts = predict_manifest(
                bundle,
                data,
                encoders,
                handle,
                cache=EmbeddingCache(cache_dir),
                batch_size=batch_size,
                top_k=top_k,
                skip_bad_rows=skip_bad_rows,
                on_rows=lambda n: bar.advance(task, n),
            )
    served = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "skipped" and v)
    skipped = counts.get("skipped", 0)
    typer.echo(
        f"wrote {out}: {sum(v for k, v in counts.items() if k != 'skipped')} predictions "
        f"({served}){f', {skipped} rows skipped' if skipped else ''}"
    )
