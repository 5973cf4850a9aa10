"""Eq. 14, the client objective: its terms and their weights, in one place for both local
trainers (client/local_trainer.py, and client/private_training.py which evaluates the same
terms per sample for DP-SGD). The terms themselves live beside their modules: L_orth (eq. 3)
in disentangler.py, L_align / L_mem (eq. 5, 11) in mapper.py, L_diff (eq. 7) in
feature_diffusion.py; each has a per-row form and a batch mean. Two additions the server's
strategy can ask for live here too: FedProx's proximal term (mu/2 ||w - w_global||^2, Li et
al. 2020; ``ProximalTerm``) and the label-prior logit adjustment of every classification term
(FedLC, Zhang et al. 2022; ``label_log_prior`` / ``classification_loss``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from crossfed.common.model.model_config import LossWeights
from torch import nn

#: Eq. 14's terms: L_cls (eq. 13), the unimodal classifiers of eq. 9 (text, and its image
#: twin), L_orth, L_align, L_diff and L_mem.
TERMS = ("cls", "text_cls", "image_cls", "orth", "align", "diff", "mem")


def term_weights(weights: LossWeights) -> dict[str, float]:
    """lambda of each term (the classification terms weigh 1)."""
    return {
        "cls": 1.0,
        "text_cls": 1.0,
        "image_cls": 1.0,
        "orth": weights.orth,
        "align": weights.align,
        "diff": weights.diff,
        "mem": weights.mem,
    }


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """sum of lambda_k * L_k over the terms given (all of eq. 14, or a part of it)."""
    lam = term_weights(weights)
    values = [value * lam[name] if lam[name] != 1.0 else value for name, value in terms.items()]
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def weight_vector(names: tuple[str, ...], weights: LossWeights) -> torch.Tensor:
    """The lambdas of ``names`` as a vector (per-sample terms [B, k] @ vector = eq. 14)."""
    lam = term_weights(weights)
    return torch.tensor([lam[name] for name in names])


def label_log_prior(labels: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor | None:
    """tau * log pi of a client's own labels (add-one smoothed so an absent class is finite);
    None when tau is 0. Added to the logits in training only (``classification_loss``), it
    stops a client whose data holds few classes from teaching the shared classifiers that the
    other classes are rare: under label skew that is what pulls FedAvg's heads apart."""
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"logit adjustment tau must be a finite number >= 0, got {tau}")
    if tau == 0:
        return None
    counts = torch.bincount(labels.long(), minlength=num_classes)[:num_classes].double()
    prior = (counts + 1.0) / (counts.sum() + num_classes)
    return (tau * prior.log()).float()


def classification_loss(
    logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of eq. 9 / 13, on logits shifted by the client's label prior when the
    round asks for it (balanced softmax: the model's own logits stay prior-free)."""
    if log_prior is not None:
        logits = logits + log_prior.to(logits.dtype)
    return nn.functional.cross_entropy(logits, y)


class ProximalTerm:
    """FedProx: mu/2 sum ||w - w_global||^2 over ``params`` (the round's trained parameters),
    anchored at their values when constructed (the global model the round started from).

    Its gradient, mu (w - w_global), is data-independent, so the trainers add it to the
    parameters' gradients after the data terms' backward (and, under DP-SGD, after clipping
    and noise: it touches no sample and spends no privacy)."""

    def __init__(self, params: Sequence[nn.Parameter], mu: float) -> None:
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"proximal mu must be a finite number > 0, got {mu}")
        self.mu = mu
        self.params = list(params)
        self.anchors = [p.detach().clone() for p in self.params]

    def value(self) -> torch.Tensor:
        """mu/2 sum ||w - w_global||^2 (no gradient; for reporting)."""
        with torch.no_grad():
            total = sum(
                ((p - a).pow(2).sum() for p, a in zip(self.params, self.anchors, strict=True)),
                start=torch.zeros(()),
            )
        return total * (self.mu / 2)

    def add_gradient(self) -> None:
        """grad += mu (w - w_global): the term's gradient, as if it were in the loss."""
        with torch.no_grad():
            for p, anchor in zip(self.params, self.anchors, strict=True):
                pull = (p - anchor).mul_(self.mu)
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)
