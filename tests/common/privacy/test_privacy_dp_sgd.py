"""DP-SGD with Opacus on a small Linear/LayerNorm MLP: reported epsilon <= target."""

from __future__ import annotations

import pytest
import torch
from crossfed.common.privacy.dp_sgd import DPSGDError, make_private_training
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:  # type: ignore[type-arg]
    torch.manual_seed(seed)
    x = torch.randn(256, 16)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return model, opt, DataLoader(TensorDataset(x, y), batch_size=32)


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_sgd_trains_and_reports_epsilon_within_target() -> None:
    model, opt, loader = _setup()
    epochs, target = 2, 3.0
    private = make_private_training(model, opt, loader, target, 1e-5, epochs, max_grad_norm=1.0)
    assert private.noise_multiplier > 0
    assert private.epsilon() == 0.0
    loss_fn = nn.CrossEntropyLoss()
    spent = []
    for _ in range(epochs):
        for xb, yb in private.data_loader:
            if len(xb) == 0:
                continue
            private.optimizer.zero_grad()
            loss_fn(private.module(xb), yb).backward()
            private.optimizer.step()
        spent.append(private.epsilon())
    assert 0 < spent[0] < spent[1] <= target
    assert spent[1] > 0.5 * target  # calibrated to the target, not wildly conservative
    with torch.no_grad():
        x, y = loader.dataset.tensors  # type: ignore[attr-defined]
        acc = (private.module(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6  # it still learns the easy rule under noise


def test_invalid_parameters_and_unsupported_layers() -> None:
    model, opt, loader = _setup()
    with pytest.raises(DPSGDError, match="target_epsilon"):
        make_private_training(model, opt, loader, 0.0, 1e-5, 1, 1.0)
    with pytest.raises(DPSGDError, match="target_delta"):
        make_private_training(model, opt, loader, 1.0, 1.5, 1, 1.0)
    with pytest.raises(DPSGDError, match="max_grad_norm"):
        make_private_training(model, opt, loader, 1.0, 1e-5, 1, 0.0)
    bn = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))
    with pytest.raises(DPSGDError, match="not DP-SGD compatible"):
        make_private_training(
            bn, torch.optim.SGD(bn.parameters(), lr=0.1), loader, 1.0, 1e-5, 1, 1.0
        )
