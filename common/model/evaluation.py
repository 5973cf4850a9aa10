"""Scores of a model per Table I configuration (both, text only, image only): accuracy,
macro-F1 and the confusion matrix. One home for how crossfed measures a model, used by the
clients (local and global accuracies), `crossfed evaluate`, the demo and the benchmarks."""

from __future__ import annotations

import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.network import CrossModalNet

CONFIGURATIONS = ("both", "text_only", "image_only")


def check_data_fits(model: CrossModalNet, data: EmbeddingSet) -> None:
    """Raise ModelInputError unless the set's feature sizes and labels fit the model."""
    model.check_fits(data.text_dim, data.image_dim, data.labels)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] counts (int64)."""
    flat = target.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean F1 over classes that occur in target or prediction."""
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(f1s) / len(f1s)) if f1s else 0.0


@torch.no_grad()
def evaluate(
    model: CrossModalNet, data: EmbeddingSet, batch_size: int = 4096
) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 per Table I configuration.

    "both" uses rows with both modalities; "text_only" every row with text (its image hidden);
    "image_only" every row with an image (its text hidden). A configuration with no rows gets
    count 0 and NaN scores.
    """
    check_data_fits(model, data)
    rows = {
        "both": data.has_text & data.has_image,
        "text_only": data.has_text,
        "image_only": data.has_image,
    }
    out: dict[str, dict[str, float]] = {}
    for name, mask in rows.items():
        idx = mask.nonzero().squeeze(1)
        if len(idx) == 0:
            out[name] = {"accuracy": float("nan"), "macro_f1": float("nan"), "count": 0.0}
            continue
        preds = []
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            text = data.text[part] if name != "image_only" else None
            image = data.image[part] if name != "text_only" else None
            external = (
                data.recovered_image[part]
                if name == "text_only" and data.recovered_image is not None
                else None
            )
            preds.append(model.predict(text, image, external).argmax(dim=1))
        pred, target = torch.cat(preds), data.labels[idx]
        out[name] = {
            "accuracy": float((pred == target).float().mean()),
            "macro_f1": macro_f1(pred, target, model.config.num_classes),
            "count": float(len(idx)),
        }
    return out
