"""Use a model bundle on a user's manifest: `evaluate` (accuracy and macro-F1 per Table I
configuration, confusion matrices) and `predict` (one output row per input row).

Both stream the manifest in batches: rows are read, their images loaded and both modalities
encoded by the bundle's own encoders (checked against the weights it was trained with)
through the embedding cache, then scored. Memory stays at one batch of images plus the
predictions, whatever the file's size.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from crossfed.common.data.class_list import label_index
from crossfed.common.data.data_errors import DataError
from crossfed.common.data.embedding_cache import EmbeddingCache, encode_images, encode_texts
from crossfed.common.data.encoder_interface import ImageEncoder, TextEncoder
from crossfed.common.data.manifest import (
    IMAGE_ERRORS,
    ManifestIssue,
    ManifestRow,
    iter_manifest_rows,
    load_image,
)
from crossfed.common.model.encoder_identity import EncoderIdentity, check_same_encoder
from crossfed.common.model.encoders import build_image_encoder, build_text_encoder
from crossfed.common.model.evaluation import CONFIGURATIONS, confusion_matrix, macro_f1
from crossfed.common.model.model_bundle import ModelBundle
from crossfed.common.model.network import CrossModalNet

#: Encoders and manifest image size a bundle without recorded encoders falls back to (the
#: client daemon's defaults).
DEFAULT_TEXT_ENCODER = "minilm"
DEFAULT_IMAGE_ENCODER = "cnn"
DEFAULT_IMAGE_SIZE = 32
#: The evaluation report's rows: Table I on paired rows, then every row as it comes.
AS_GIVEN = "as_given"


class InferenceInputError(DataError):
    """A manifest row or an encoder that `evaluate` / `predict` cannot use."""


@dataclass
class BundleEncoders:
    """The frozen encoders a bundle's features came from, rebuilt here and checked."""

    text: TextEncoder
    image: ImageEncoder
    image_size: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_bundle(
        cls, bundle: ModelBundle, text_spec: str | None = None, image_spec: str | None = None
    ) -> BundleEncoders:
        """Build the bundle's encoders (or the given specs, which must have the same weights);
        raises EncoderMismatchError / EncoderError with one line."""
        notes: list[str] = []
        text = _build(
            "text",
            bundle.text_encoder,
            text_spec,
            DEFAULT_TEXT_ENCODER,
            notes,
            lambda spec: build_text_encoder(spec),
        )
        recorded = bundle.image_encoder
        size = recorded.image_size if recorded is not None and recorded.image_size else 0
        size = size or DEFAULT_IMAGE_SIZE
        image = _build(
            "image",
            recorded,
            image_spec,
            DEFAULT_IMAGE_ENCODER,
            notes,
            lambda spec: build_image_encoder(spec, out_dim=bundle.model_config.image_dim),
            image_size=size,
        )
        return cls(text, image, size, notes)  # type: ignore[arg-type]


def _build(
    kind: str,
    recorded: EncoderIdentity | None,
    spec: str | None,
    default: str,
    notes: list[str],
    build: Callable[[str], TextEncoder | ImageEncoder],
    image_size: int = 0,
) -> TextEncoder | ImageEncoder:
    chosen = spec or (recorded.spec if recorded is not None else default)
    if recorded is None:
        notes.append(
            f"the bundle records no {kind} encoder (no client held {kind}); using {chosen!r}"
        )
    try:
        encoder = build(chosen)
    except DataError as exc:
        if recorded is None or spec is not None:
            raise
        raise InferenceInputError(
            f"cannot rebuild the bundle's {kind} encoder {recorded.spec!r} ({exc}); pass "
            f"--{kind}-encoder with the same weights ({recorded.identity})"
        ) from None
    if recorded is not None:
        check_same_encoder(kind, recorded, EncoderIdentity(chosen, encoder.identity, image_size))
    return encoder


@dataclass
class EncodedBatch:
    """Features of a batch of manifest rows (zero rows where a modality is absent)."""

    rows: list[ManifestRow]
    text: torch.Tensor
    image: torch.Tensor
    has_text: torch.Tensor
    has_image: torch.Tensor


def encode_batch(
    rows: list[ManifestRow],
    encoders: BundleEncoders,
    dims: tuple[int, int],
    cache: EmbeddingCache | None,
) -> tuple[EncodedBatch, list[ManifestIssue]]:
    """Load the batch's images and encode both modalities (eq. 1); rows whose image cannot
    be read come back as issues instead."""
    kept: list[ManifestRow] = []
    pixels: list[np.ndarray] = []
    issues: list[ManifestIssue] = []
    for row in rows:
        if row.image is not None:
            try:
                pixels.append(load_image(row.image, encoders.image_size))
            except IMAGE_ERRORS as exc:
                issues.append(
                    ManifestIssue(row.line, f"unreadable image {row.image}: {exc}", "image")
                )
                continue
        kept.append(row)
    n = len(kept)
    has_text = torch.tensor([bool(r.text) for r in kept], dtype=torch.bool)
    has_image = torch.tensor([r.image is not None for r in kept], dtype=torch.bool)
    text = torch.zeros(n, dims[0])
    image = torch.zeros(n, dims[1])
    if bool(has_text.any()):
        idx = has_text.nonzero().squeeze(1)
        text[idx] = encode_texts(encoders.text, [kept[i].text for i in idx.tolist()], cache)
    if pixels:
        image[has_image.nonzero().squeeze(1)] = encode_images(
            encoders.image, np.stack(pixels), cache
        )
    return EncodedBatch(kept, text, image, has_text, has_image), issues


def batches(
    path: Path,
    *,
    batch_size: int,
    require_label: bool,
    class_names: Sequence[str] | None,
) -> Iterator[tuple[list[ManifestRow], list[ManifestIssue]]]:
    """The manifest's rows in batches, with the bad rows met along the way."""
    rows: list[ManifestRow] = []
    issues: list[ManifestIssue] = []
    for item in iter_manifest_rows(path, require_label=require_label, class_names=class_names):
        if isinstance(item, ManifestIssue):
            issues.append(item)
        else:
            rows.append(item)
        if len(rows) >= batch_size:
            yield rows, issues
            rows, issues = [], []
    if rows or issues:
        yield rows, issues


def _predict_rows(model: CrossModalNet, batch: EncodedBatch) -> tuple[torch.Tensor, list[str]]:
    """Probabilities [n, C] with each row on its own Table I path, and the path's name."""
    n = len(batch.rows)
    probs = torch.zeros(n, model.config.num_classes)
    paths = [""] * n
    groups = {
        "both": batch.has_text & batch.has_image,
        "text_only": batch.has_text & ~batch.has_image,
        "image_only": ~batch.has_text & batch.has_image,
    }
    for name, mask in groups.items():
        idx = mask.nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        text = batch.text[idx] if name != "image_only" else None
        image = batch.image[idx] if name != "text_only" else None
        probs[idx] = torch.softmax(model.predict(text, image), dim=1)
        if name == "text_only":
            kinds = [f"text_only:{k}" for k in model.recovery_paths(batch.text[idx])]
        else:
            kinds = ["both" if name == "both" else "image_only:mapper"] * len(idx)
        for i, kind in zip(idx.tolist(), kinds, strict=True):
            paths[i] = kind
    return probs, paths


# --------------------------------------------------------------------------- evaluate


@dataclass
class ConfigurationScores:
    """Predictions of one configuration, gathered batch by batch."""

    predictions: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.predictions.append(pred)
        self.targets.append(target)

    def summary(self, num_classes: int) -> dict[str, object]:
        if not self.predictions:
            return {"rows": 0, "accuracy": math.nan, "macro_f1": math.nan}
        pred, target = torch.cat(self.predictions), torch.cat(self.targets)
        return {
            "rows": len(pred),
            "accuracy": float((pred == target).float().mean()),
            "macro_f1": macro_f1(pred, target, num_classes),
            "confusion": confusion_matrix(pred, target, num_classes).tolist(),
        }


@dataclass
class EvaluationResult:
    """What `crossfed evaluate` reports: scores per configuration and the rows it skipped."""

    bundle: str
    data: str
    class_names: list[str]
    scores: dict[str, dict[str, object]]
    rows_read: int
    skipped: list[ManifestIssue]
    as_given_rows: dict[str, int]
    notes: list[str]

    def to_json(self) -> dict[str, object]:
        return {
            "bundle": self.bundle,
            "data": self.data,
            "class_names": self.class_names,
            "rows_read": self.rows_read,
            "rows_skipped": len(self.skipped),
            "skipped": [str(i) for i in self.skipped[:100]],
            "as_given_rows": self.as_given_rows,
            "configurations": self.scores,
            "notes": self.notes,
        }


def _labels(rows: list[ManifestRow], index: dict[str, int]) -> torch.Tensor:
    return torch.tensor([label_index(r.label, index) for r in rows], dtype=torch.long)


def evaluate_manifest(
    bundle: ModelBundle,
    bundle_name: str,
    path: Path,
    encoders: BundleEncoders,
    *,
    cache: EmbeddingCache | None,
    batch_size: int = 1024,
    skip_bad_rows: bool = False,
    on_rows: Callable[[int], None] = lambda n: None,
) -> EvaluationResult:
    """Score the bundle on a labelled manifest: 'both', 'text_only' and 'image_only' on the
    rows holding both (the other modality hidden), then 'as_given': every row with the
    modalities it holds, each on its own Table I path."""
    model = bundle.build_model()
    c = bundle.model_config.num_classes
    index = {name: i for i, name in enumerate(bundle.class_names)}
    scores = {name: ConfigurationScores() for name in (*CONFIGURATIONS, AS_GIVEN)}
    as_given_rows = dict.fromkeys(CONFIGURATIONS, 0)
    skipped: list[ManifestIssue] = []
    read = 0
    dims = (bundle.model_config.text_dim, bundle.model_config.image_dim)
    for rows, issues in batches(
        path, batch_size=batch_size, require_label=True, class_names=bundle.class_names
    ):
        read += len(rows) + len(issues)
        batch, unreadable = encode_batch(rows, encoders, dims, cache)
        for issue in [*issues, *unreadable]:
            if not skip_bad_rows:
                raise InferenceInputError(f"{path}: {issue} (--skip-bad-rows skips such rows)")
            skipped.append(issue)
        on_rows(len(rows) + len(issues))
        if not batch.rows:
            continue
        target = _labels(batch.rows, index)
        paired = (batch.has_text & batch.has_image).nonzero().squeeze(1)
        if len(paired):
            t, i, y = batch.text[paired], batch.image[paired], target[paired]
            scores["both"].add(model.predict(t, i).argmax(1), y)
            scores["text_only"].add(model.predict(t, None).argmax(1), y)
            scores["image_only"].add(model.predict(None, i).argmax(1), y)
        probs, paths = _predict_rows(model, batch)
        scores[AS_GIVEN].add(probs.argmax(1), target)
        for kind in paths:
            as_given_rows[kind.split(":")[0]] += 1
    if not scores[AS_GIVEN].predictions:
        raise InferenceInputError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return EvaluationResult(
        bundle=bundle_name,
        data=str(path),
        class_names=list(bundle.class_names),
        scores={name: s.summary(c) for name, s in scores.items()},
        rows_read=read,
        skipped=skipped,
        as_given_rows=as_given_rows,
        notes=list(encoders.notes),
    )


def plot_confusions(result: EvaluationResult, path: Path) -> None:
    """One confusion-matrix panel per configuration that has rows (rows: true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(n, s) for n, s in result.scores.items() if s.get("rows")]
    c = len(result.class_names)
    size = min(4.0 + 0.35 * c, 12.0)
    fig, axes = plt.subplots(1, len(shown), figsize=(size * len(shown), size), squeeze=False)
    for ax, (name, score) in zip(axes[0], shown, strict=True):
        matrix = np.asarray(score["confusion"], dtype=float)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
        ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"{name}: acc {score['accuracy']:.3f} ({score['rows']} rows)")
        ticks = list(range(c)) if c <= 30 else []
        ax.set_xticks(ticks, [result.class_names[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [result.class_names[i] for i in ticks], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if c <= 15:
            for (r, k), count in np.ndenumerate(matrix):
                if count:
                    color = "white" if rates[r, k] > 0.5 else "black"
                    ax.text(k, r, int(count), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(result: EvaluationResult) -> str:
    """The evaluation as a markdown table (what report.md holds)."""
    lines = [
        f"# Evaluation of {result.bundle} on {result.data}",
        "",
        (
            f"{result.rows_read} rows read, {len(result.skipped)} skipped. "
            "`both`, `text_only` and `image_only` score the rows holding both modalities with "
            "the other one hidden (Table I); `as_given` scores every row with what it holds "
            f"({', '.join(f'{k} {v}' for k, v in result.as_given_rows.items())})."
        ),
        "",
        "| configuration | rows | accuracy | macro-F1 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, score in result.scores.items():
        if score["rows"]:
            lines.append(
                f"| {name} | {score['rows']} | {score['accuracy']:.3f} | {score['macro_f1']:.3f} |"
            )
        else:
            lines.append(f"| {name} | 0 | - | - |")
    lines += ["", "![confusion matrices](confusion.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- predict

PREDICTION_COLUMNS = (
    "line",
    "image",
    "text",
    "label",
    "predicted",
    "probability",
    "top_k",
    "path",
    "error",
)


def predict_manifest(
    bundle: ModelBundle,
    path: Path,
    encoders: BundleEncoders,
    out: TextIO,
    *,
    cache: EmbeddingCache | None,
    batch_size: int = 512,
    top_k: int = 3,
    skip_bad_rows: bool = False,
    on_rows: Callable[[int], None] = lambda n: None,
) -> dict[str, int]:
    """Write one CSV row per manifest row: predicted class, its probability, the top-k, and
    the Table I path that served it; a skipped row keeps its line with the error. Returns
    counts per path."""
    model = bundle.build_model()
    names = bundle.class_names
    k = max(1, min(top_k, len(names)))
    writer = csv.writer(out)
    writer.writerow(PREDICTION_COLUMNS)
    counts: dict[str, int] = {}
    dims = (bundle.model_config.text_dim, bundle.model_config.image_dim)
    for rows, issues in batches(path, batch_size=batch_size, require_label=False, class_names=None):
        batch, unreadable = encode_batch(rows, encoders, dims, cache)
        bad = sorted([*issues, *unreadable], key=lambda i: i.line)
        if bad and not skip_bad_rows:
            raise InferenceInputError(
                f"{path}: {bad[0]} (--skip-bad-rows writes such rows with the error)"
            )
        out_rows: list[tuple[int, list[object]]] = [
            (i.line, [i.line, "", "", "", "", "", "", "", str(i)]) for i in bad
        ]
        if batch.rows:
            probs, paths = _predict_rows(model, batch)
            top_p, top_i = probs.topk(k, dim=1)
            for r, row in enumerate(batch.rows):
                top = ";".join(
                    f"{names[int(c)]}:{float(p):.4f}"
                    for p, c in zip(top_p[r], top_i[r], strict=True)
                )
                out_rows.append(
                    (
                        row.line,
                        [
                            row.line,
                            "" if row.image is None else str(row.image),
                            row.text,
                            row.label,
                            names[int(top_i[r, 0])],
                            f"{float(top_p[r, 0]):.4f}",
                            top,
                            paths[r],
                            "",
                        ],
                    )
                )
                counts[paths[r]] = counts.get(paths[r], 0) + 1
        counts["skipped"] = counts.get("skipped", 0) + len(bad)
        for _, values in sorted(out_rows, key=lambda item: item[0]):
            writer.writerow(values)
        on_rows(len(rows) + len(issues))
    return counts


def count_rows(path: Path) -> int | None:
    """Data rows in a manifest (for a progress bar's total); None if it cannot be counted
    cheaply (then the bar just counts up)."""
    try:
        with path.open("rb") as fh:
            lines = sum(1 for line in fh if line.strip())
    except OSError:
        return None
    return max(lines - (1 if path.suffix.lower() == ".csv" else 0), 0)


__all__ = [
    "AS_GIVEN",
    "BundleEncoders",
    "EvaluationResult",
    "InferenceInputError",
    "count_rows",
    "evaluate_manifest",
    "plot_confusions",
    "predict_manifest",
    "report_markdown",
]
