"""CrossModalNet: the client network of eq. 2-14 on top of frozen embeddings (eq. 1).

Modules (names are what `module_of` returns, and what module-aware FedAvg averages over):
disentangler (D_i, eq. 2-3), mapper (M_it, eq. 4-5), diffusion (eq. 6-7 in feature space;
the fallback in `stable-diffusion` mode), sd_recovery (`stable-diffusion` mode only: deltas of
the fine-tuned attn2 / text-projection tensors of Stable Diffusion, eq. 6-7),
text_classifier (Classifier(f_t) of eq. 9, picks the VLMR class), image_classifier (its
image-side twin, not in the paper), fusion (eq. 12), head (eq. 13) and memory (VLMR, eq. 8-11:
buffers only, never shared).

Departures from the paper (measured in BENCHMARKS.md, quality section):
- Classifier(f_t) of eq. 9 is an MLP with an input LayerNorm and the fusion path's depth (a
  bare linear layer on unit-norm sentence embeddings stayed near chance after federated
  training, so VLMR picked the wrong class);
- with `unimodal_ensemble`, a row missing a modality is scored by the fusion head AND by the
  unimodal classifier of the modality it has (eq. 9 read as "the classifier predicts a label
  based on the available features"), log-probabilities added. The unimodal classifiers are
  trained on every row holding their modality, so unlike the shared fusion head they do not
  drift when clients with different missing patterns fill the slots differently;
- with `paired_ensemble` as well, paired rows add both unimodal classifiers to the fusion
  head: under per-client missingness few clients hold paired rows, so the fusion head's paired
  path is the least trained part of the model, while each unimodal classifier has seen every
  row holding its modality. A label carried only by the interaction of the modalities leaves
  the unimodal posteriors flat, so the fusion head still decides there;
- with `calibrate_image_classifier`, image-only rows read the image classifier's body through
  `image_calibration` and the fusion output through `head_calibration`: last layers the server
  refits after federated training on virtual features from the clients' per-class feature
  statistics (CCVR; see common/model/classifier_calibration.py). Clients never train them
  (buffers only, module weight 0 in FedAvg); until fitted (`ready` False) the federated
  layers are used. With `calibrate_text_classifier`, text-only rows do the same through
  `text_calibration` (the text classifier's last layer) and `text_head_calibration` (the head
  on the text-only view). Paired rows keep the federated fusion head; the paired ensemble
  reads the unimodal classifiers through their calibrated last layers once fitted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.common.model.disentangler import Disentangler
from crossfed.common.model.feature_diffusion import FeatureDiffusion
from crossfed.common.model.fusion import FusionMLP
from crossfed.common.model.mapper import CrossModalMapper
from crossfed.common.model.memory import VisualLinguisticMemory
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelInputError, StateDictError
from crossfed.common.model.sd_trainable import TrainableDeltas
from torch import nn

PRIVATE_MODULES = frozenset({"memory"})


@dataclass
class Recovery:
    """Recovered features for the rows that miss a modality (rows that don't hold zeros)."""

    text: torch.Tensor  # f^_t = M_it(f_i->t)
    image: torch.Tensor  # f^_i from diffusion, VLMR or an external (SD) source


class SimplexClassifier(nn.Module):
    """FedETF's last layer: logits = scale * <W_c, h / ||h||> with W a fixed simplex
    equiangular tight frame (C unit vectors at equal, maximal angles; Li et al., ICCV 2023).
    W is a buffer built from its own fixed-seed generator, identical on every client and
    drawing nothing from torch's global one; only the scale is learned."""

    weight: torch.Tensor

    def __init__(self, in_dim: int, num_classes: int, init_scale: float = 10.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(num_classes * 7919 + in_dim)
        basis, _ = torch.linalg.qr(torch.randn(in_dim, num_classes, generator=gen))
        centred = torch.eye(num_classes) - torch.full((num_classes, num_classes), 1 / num_classes)
        etf = (basis @ centred).T * math.sqrt(num_classes / (num_classes - 1))
        self.register_buffer("weight", etf.contiguous())
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        unit = nn.functional.normalize(hidden, dim=-1)
        return nn.functional.linear(unit, self.weight) * self.log_scale.exp()


def last_layer(hidden_dim: int, num_classes: int, fixed: bool) -> nn.Module:
    """A classifier's last layer: learned (nn.Linear) or FedETF's fixed simplex."""
    if fixed:
        return SimplexClassifier(hidden_dim, num_classes)
    return nn.Linear(hidden_dim, num_classes)


def unimodal_classifier(
    in_dim: int, hidden_dim: int, num_classes: int, fixed_last: bool = False
) -> nn.Sequential:
    """Classifier over one modality's embedding (eq. 9): LayerNorm first, so the scale of a
    frozen encoder's output does not set the learning speed, then the fusion path's depth
    (two LayerNorm/SiLU layers) so it is no weaker than the fusion head on that modality."""
    return nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.SiLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.SiLU(),
        last_layer(hidden_dim, num_classes, fixed_last),
    )


class CalibratedLayer(nn.Module):
    """A server-fitted copy of a last layer (image classifier or fusion head) that replaces
    it for image-only rows (CCVR, common/model/classifier_calibration.py).

    Weight and bias are buffers, not parameters: no local optimizer or DP engine sees them,
    and clients report 0 samples for the module, so FedAvg keeps the server's value. They
    start at zero without drawing random numbers (every other module keeps its seeded
    initialisation) and are only used once `ready` (a bool buffer) is set.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    ready: torch.Tensor

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, in_dim))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)


def _through(
    classifier: nn.Sequential, calibration: CalibratedLayer | None, x: torch.Tensor
) -> torch.Tensor:
    """``classifier``'s logits, with its last layer replaced by ``calibration`` once fitted."""
    if calibration is None or not bool(calibration.ready):
        return classifier(x)
    return calibration(classifier[:-1](x))


class CrossModalNet(nn.Module):
    """The paper's network; `predict` implements the inference strategies of Table I."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ModelConfig()
        d_t, d_i, h = cfg.text_dim, cfg.image_dim, cfg.hidden_dim
        self.disentangler = Disentangler(d_i, h)
        self.mapper = CrossModalMapper(d_i, d_t, h)
        # Built in both recovery modes: with stable-diffusion it is the fallback of every
        # client that runs without the checkpoint (and of evaluation without generated images).
        self.diffusion: FeatureDiffusion | None = FeatureDiffusion(
            d_i, d_t, h, cfg.diffusion_train_steps, cfg.diffusion_sample_steps
        )
        fixed = cfg.fixed_classifier
        self.text_classifier = unimodal_classifier(d_t, h, cfg.num_classes, fixed)
        self.image_classifier = unimodal_classifier(d_i, h, cfg.num_classes, fixed)
        self.fusion = FusionMLP(d_t, d_i, h)
        self.head = last_layer(h, cfg.num_classes, fixed)
        self.memory = VisualLinguisticMemory(
            cfg.num_classes, cfg.memory_capacity, d_t, d_i, cfg.memory_tau, cfg.memory_top_k
        )
        # Last, and without random numbers: the modules above keep their seeded init.
        # image_calibration replaces image_classifier[-1], head_calibration replaces head,
        # both for image-only rows only (CCVR, see calibrate_image_classifier).
        calibrate = cfg.calibrate_image_classifier
        self.image_calibration = CalibratedLayer(h, cfg.num_classes) if calibrate else None
        self.head_calibration = CalibratedLayer(h, cfg.num_classes) if calibrate else None
        # The same for text-only rows (text_classifier[-1], head; calibrate_text_classifier).
        calibrate_text = cfg.calibrate_text_classifier
        self.text_calibration = CalibratedLayer(h, cfg.num_classes) if calibrate_text else None
        self.text_head_calibration = CalibratedLayer(h, cfg.num_classes) if calibrate_text else None
        # stable-diffusion mode: the fine-tuned SD tensors' deltas from the base checkpoint
        # (zeros, no random numbers; common/model/sd_trainable.py). Buffers: only the SD
        # fine-tuning of a client holding the checkpoint writes them.
        sd = cfg.stable_diffusion
        self.sd_recovery = TrainableDeltas(sd.trainable_spec()) if sd is not None else None

    # -- federation interface -------------------------------------------------------------
    @staticmethod
    def module_of(key: str) -> str:
        """Named module a state key belongs to ("mapper.net.0.weight" -> "mapper")."""
        return key.split(".", 1)[0]

    def shareable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything FedAvg averages; excludes the VLMR memory (a client's own features)."""
        return {
            k: v.detach().clone()
            for k, v in self.state_dict().items()
            if self.module_of(k) not in PRIVATE_MODULES
        }

    def load_shareable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a global model; keys/shapes must match exactly, memory is left untouched."""
        own = self.shareable_state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise StateDictError(
                f"state dict mismatch: missing {missing[:5]}, unexpected "
                f"{extra[:5]} ({len(missing)} missing, {len(extra)} unexpected)"
            )
        bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if bad:
            k = bad[0]
            raise StateDictError(
                f"shape mismatch for {k}: model {tuple(own[k].shape)}, "
                f"given {tuple(state[k].shape)} ({len(bad)} keys differ)"
            )
        self.load_state_dict(dict(state), strict=False)

    def check_fits(self, text_dim: int, image_dim: int, labels: torch.Tensor) -> None:
        """Raise ModelInputError unless features of these sizes and these labels fit."""
        cfg = self.config
        if text_dim != cfg.text_dim or image_dim != cfg.image_dim:
            raise ModelInputError(
                f"data dims (text {text_dim}, image {image_dim}) do not "
                f"match the model (text {cfg.text_dim}, image {cfg.image_dim})"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
            raise ModelInputError(
                f"labels must be in [0, {cfg.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    # -- recovery -------------------------------------------------------------------------
    def recover_image(
        self,
        f_t: torch.Tensor,
        generator: torch.Generator | None = None,
        external: torch.Tensor | None = None,
        steps: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """f^_i for text-only rows (Table I: diffusion or VLMR), no gradient.

        `external` (SD mode: generated images encoded by E_i) wins where given; otherwise the
        configured path; VLMR falls back to diffusion for classes with no memory entries and
        vice versa when no diffusion exists. ``noise`` [n, image_dim], when given, is each
        row's diffusion starting noise (instead of draws from ``generator``), which makes a
        row's f^_i depend on that row alone.
        """
        with torch.no_grad():
            if external is not None:
                return external
            use_memory = self.config.text_only_recovery == "memory" or self.diffusion is None
            if not use_memory and self.diffusion is not None:
                return self.diffusion.sample(f_t, steps=steps, generator=generator, noise=noise)
            classes = self.text_classifier(f_t).argmax(dim=1)  # eq. 9
            out = self.memory.retrieve(f_t, classes)  # eq. 10
            empty = ~self.memory.has_entries(classes)
            if bool(empty.any()) and self.diffusion is not None:
                out[empty] = self.diffusion.sample(
                    f_t[empty],
                    steps=steps,
                    generator=generator,
                    noise=None if noise is None else noise[empty],
                )
            return out

    @torch.no_grad()
    def recovery_paths(self, f_t: torch.Tensor) -> list[str]:
        """Which recovery `recover_image` uses for each text-only row: 'memory' (VLMR,
        eq. 9-10), 'diffusion' (eq. 6-7), or 'zero' for the zero-fill baseline."""
        if self.config.missing_fill == "zero":
            return ["zero"] * f_t.shape[0]
        use_memory = self.config.text_only_recovery == "memory" or self.diffusion is None
        if not use_memory:
            return ["diffusion"] * f_t.shape[0]
        found = self.memory.has_entries(self.text_classifier(f_t).argmax(dim=1))
        fallback = "diffusion" if self.diffusion is not None else "memory"
        return ["memory" if bool(hit) else fallback for hit in found]

    def recover_text(self, f_i: torch.Tensor) -> torch.Tensor:
        """f^_t = M_it(f_i->t) (eq. 4)."""
        f_it, _ = self.disentangler(f_i)
        return self.mapper(f_it)

    # -- forward / inference --------------------------------------------------------------
    def classify(
        self,
        f_t: torch.Tensor,
        f_i: torch.Tensor,
        has_text: torch.Tensor,
        has_image: torch.Tensor,
        recovery: Recovery | None,
    ) -> torch.Tensor:
        """Eq. 12-13: logits from the four fusion slots (built implicitly, see forward_views);
        at inference, image-only rows go through ``head_calibration`` and text-only rows
        through ``text_head_calibration`` once they are fitted."""
        hidden = self.fusion.forward_views(
            f_t,
            f_i,
            has_text,
            has_image,
            None if recovery is None else recovery.text,
            None if recovery is None else recovery.image,
        )
        logits = self.head(hidden)
        if self.training:
            return logits
        for cal, rows in (
            (self.head_calibration, has_image & ~has_text),
            (self.text_head_calibration, has_text & ~has_image),
        ):
            if cal is not None and bool(cal.ready) and bool(rows.any()):
                logits[rows] = cal(hidden[rows])
        return logits

    def forward(
        self,
        f_t: torch.Tensor,
        f_i: torch.Tensor,
        has_text: torch.Tensor,
        has_image: torch.Tensor,
        external_image: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits for a mixed batch: each row uses the Table I strategy for its modalities."""
        self._check(f_t, f_i, has_text, has_image)
        if self.config.missing_fill == "zero":
            return self.classify(f_t, f_i, has_text, has_image, None)
        rec_t = torch.zeros_like(f_t)
        rec_i = torch.zeros_like(f_i)
        image_only = has_image & ~has_text
        text_only = has_text & ~has_image
        if bool(image_only.any()) and self.config.recover_text:
            rec_t[image_only] = self.recover_text(f_i[image_only])
        if bool(text_only.any()):
            ext = None if external_image is None else external_image[text_only]
            rec_i[text_only] = self.recover_image(f_t[text_only], generator, ext)
        logits = self.classify(f_t, f_i, has_text, has_image, Recovery(rec_t, rec_i))
        if not self.config.unimodal_ensemble or self.training:
            return logits
        paired = has_text & has_image if self.config.paired_ensemble else None
        return self.ensemble_missing(logits, f_t, f_i, text_only, image_only, paired)

    def ensemble_missing(
        self,
        logits: torch.Tensor,
        f_t: torch.Tensor,
        f_i: torch.Tensor,
        text_only: torch.Tensor,
        image_only: torch.Tensor,
        paired: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows missing a modality: log p_fusion + log p_unimodal (eq. 9 for the modality
        present); rows in `paired` add both unimodal classifiers, the others keep the fusion
        head's logits."""
        out = logits.clone()
        log_p = nn.functional.log_softmax
        if paired is not None and bool(paired.any()):
            uni_t = log_p(self.text_logits(f_t[paired]), dim=1)
            uni_i = log_p(self.image_logits(f_i[paired]), dim=1)
            out[paired] = log_p(logits[paired], dim=1) + uni_t + uni_i
        if bool(text_only.any()):
            uni = self.text_logits(f_t[text_only])
            out[text_only] = log_p(logits[text_only], dim=1) + log_p(uni, dim=1)
        if bool(image_only.any()):
            uni = self.image_logits(f_i[image_only])
            out[image_only] = log_p(logits[image_only], dim=1) + log_p(uni, dim=1)
        return out

    def image_logits(self, f_i: torch.Tensor) -> torch.Tensor:
        """The image classifier's logits at inference (image-only rows, and paired rows in
        the paired ensemble): through the server-calibrated last layer once it is fitted
        (`calibrate_image_classifier`), else the federated one. Measured at per-client α 0.1
        (seed 0-1): the calibrated layers lift paired rows by 0.5-2.8 points, headline +0.05."""
        return _through(self.image_classifier, self.image_calibration, f_i)

    def text_logits(self, f_t: torch.Tensor) -> torch.Tensor:
        """The text classifier's logits at inference, likewise (`calibrate_text_classifier`)."""
        return _through(self.text_classifier, self.text_calibration, f_t)

    @torch.no_grad()
    def predict(
        self,
        text: torch.Tensor | None,
        image: torch.Tensor | None,
        external_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Table I: text-only -> (f_t, f^_i); image-only -> (f_i, f^_t); both -> (f_t, f_i).

        Deterministic: diffusion sampling noise comes from a fixed-seed generator.
        """
        if text is None and image is None:
            raise ModelInputError("predict needs text, image or both; got neither")
        ref = text if text is not None else image
        assert ref is not None
        n = ref.shape[0]
        f_t = text if text is not None else torch.zeros(n, self.config.text_dim)
        f_i = image if image is not None else torch.zeros(n, self.config.image_dim)
        has_t = torch.full((n,), text is not None, dtype=torch.bool)
        has_i = torch.full((n,), image is not None, dtype=torch.bool)
        was_training = self.training
        self.eval()
        try:
            gen = torch.Generator().manual_seed(self.config.sample_seed)
            return self.forward(f_t, f_i, has_t, has_i, external_image, gen)
        finally:
            self.train(was_training)

    def _check(
        self, f_t: torch.Tensor, f_i: torch.Tensor, has_text: torch.Tensor, has_image: torch.Tensor
    ) -> None:
        cfg = self.config
        if f_t.dim() != 2 or f_t.shape[1] != cfg.text_dim:
            raise ModelInputError(
                f"text features must be [N, {cfg.text_dim}], got {tuple(f_t.shape)}"
            )
        if f_i.dim() != 2 or f_i.shape[1] != cfg.image_dim:
            raise ModelInputError(
                f"image features must be [N, {cfg.image_dim}], got {tuple(f_i.shape)}"
            )
        n = f_t.shape[0]
        if f_i.shape[0] != n or has_text.shape != (n,) or has_image.shape != (n,):
            raise ModelInputError("text, image and presence masks must have the same rows")
        if bool((~has_text & ~has_image).any()):
            raise ModelInputError("a row has neither text nor image")
