"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi): update rules, module-awareness,
validated state and bit-identical resume after a restart."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import pytest
import torch
from crossfed.server.strategies.base import RoundAggregator, Strategy
from crossfed.server.strategies.server_optimizers import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
)
from safetensors.torch import load, save
from support.weighted_mean_strategy import WeightedMeanStrategy, module_of_prefix

State = dict[str, torch.Tensor]


def initial_state() -> State:
    gen = torch.Generator().manual_seed(0)
    return {
        "enc.weight": torch.randn(4, 3, generator=gen),
        "enc.bias": torch.randn(4, generator=gen),
        "head.weight": torch.randn(2, 4, generator=gen),
        "head.steps": torch.tensor(7, dtype=torch.int64),
    }


def uploads(
    global_state: State, round_no: int, trained: tuple[str, ...] = ("enc", "head")
) -> list[tuple[State, dict[str, float]]]:
    """Three clients' uploads: global + a client-specific drift + noise; modules outside
    ``trained`` get weight 0 (and an upload value the server must ignore)."""
    gen = torch.Generator().manual_seed(1000 + round_no)
    out = []
    for client in range(3):
        update = {
            k: (v + 0.1 * (client + 1) + 0.05 * torch.randn(v.shape, generator=gen))
            if v.is_floating_point()
            else v + 100
            for k, v in sorted(global_state.items())  # a checkpoint may reorder keys
        }
        weights = {m: float(10 * (client + 1)) if m in trained else 0.0 for m in ("enc", "head")}
        out.append((update, weights))
    return out


def run_round(
    strategy: ServerOptimizer, global_state: State, round_no: int, trained: tuple[str, ...]
) -> State:
    agg = strategy.begin_round(global_state, module_of_prefix)
    for update, weights in uploads(global_state, round_no, trained):
        agg.add(update, weights, num_samples=int(max(weights.values())))
    return strategy.finish_round(global_state, agg.result())


def fedavg_round(global_state: State, round_no: int, trained: tuple[str, ...]) -> State:
    agg = WeightedMeanStrategy().begin_round(global_state, module_of_prefix)
    for update, weights in uploads(global_state, round_no, trained):
        agg.add(update, weights, num_samples=int(max(weights.values())))
    return agg.result().state


OPTIMIZERS: dict[str, Callable[[], ServerOptimizer]] = {
    "fedavgm": lambda: FedAvgM(WeightedMeanStrategy(), server_lr=0.7, momentum=0.9),
    "fedadagrad": lambda: FedAdagrad(WeightedMeanStrategy(), server_lr=0.05, tau=1e-2),
    "fedadam": lambda: FedAdam(WeightedMeanStrategy(), server_lr=0.05, tau=1e-2),
    "fedyogi": lambda: FedYogi(WeightedMeanStrategy(), server_lr=0.05, tau=1e-2),
}

SCHEDULE: list[tuple[str, ...]] = [("enc", "head"), ("enc",), ("enc", "head"), ("head",), ("enc",)]


def reference_run(name: str, rounds: int) -> State:
    """The paper's update rules written out in float64 per module (independent of the code
    under test): x += eta m / (sqrt(v) + tau), momentum for FedAvgM."""
    lr, b1, b2, tau, mom = (
        (0.7, 0.0, 0.0, 0.0, 0.9) if name == "fedavgm" else (0.05, 0.9, 0.99, 1e-2, 0)
    )
    x = initial_state()
    m: State = {}
    v: State = {}
    for r in range(rounds):
        trained = SCHEDULE[r]
        avg = fedavg_round(x, r, trained)
        nxt = dict(x)
        for key, glob in x.items():
            if not glob.is_floating_point() or module_of_prefix(key) not in trained:
                continue
            d = avg[key].double() - glob.double()
            if name == "fedavgm":
                m[key] = mom * m.get(key, torch.zeros_like(d)) + d
                nxt[key] = (glob.double() + lr * m[key]).float()
                continue
            m[key] = b1 * m.get(key, torch.zeros_like(d)) + (1 - b1) * d
            prev = v.get(key, torch.full_like(d, tau**2))
            if name == "fedadagrad":
                v[key] = prev + d * d
            elif name == "fedadam":
                v[key] = b2 * prev + (1 - b2) * d * d
            else:
                v[key] = prev - (1 - b2) * d * d * torch.sign(prev - d * d)
            nxt[key] = (glob.double() + lr * m[key] / (v[key].sqrt() + tau)).float()
        x = nxt
    return x


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_rule_matches_the_paper(name: str) -> None:
    strategy = OPTIMIZERS[name]()
    x = initial_state()
    for r in range(len(SCHEDULE)):
        x = run_round(strategy, x, r, SCHEDULE[r])
    expected = reference_run(name, len(SCHEDULE))
    for key in x:
        torch.testing.assert_close(x[key], expected[key], rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_is_fedavg() -> None:
    strategy = FedAvgM(WeightedMeanStrategy(), server_lr=1.0, momentum=0.0)
    x = y = initial_state()
    for r in range(3):
        x = run_round(strategy, x, r, ("enc", "head"))
        y = fedavg_round(y, r, ("enc", "head"))
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_untrained_module_keeps_value_and_state(name: str) -> None:
    strategy = OPTIMIZERS[name]()
    x0 = initial_state()
    x1 = run_round(strategy, x0, 0, ("enc", "head"))
    head_state = {
        k: v for k, v in strategy.state_dict().items() if "head." in k or k.endswith("head")
    }
    assert head_state, "the first round should have created head's optimizer state"
    x2 = run_round(strategy, x1, 1, ("enc",))
    assert torch.equal(x2["head.weight"], x1["head.weight"])
    assert not torch.equal(x2["enc.weight"], x1["enc.weight"])
    after = strategy.state_dict()
    for key, value in head_state.items():
        assert torch.equal(after[key], value), f"{key} changed in a round head did not train"
    assert int(after["steps/enc"]) == 2 and int(after["steps/head"]) == 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_integer_buffers_and_global_state_untouched(name: str) -> None:
    strategy = OPTIMIZERS[name]()
    x0 = initial_state()
    before = {k: v.clone() for k, v in x0.items()}
    x1 = run_round(strategy, x0, 0, ("enc", "head"))
    assert torch.equal(x1["head.steps"], before["head.steps"])
    for key in x0:
        assert torch.equal(x0[key], before[key]), f"finish_round modified global {key}"
    assert x1["enc.weight"].dtype == torch.float32


def checkpoint_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    return save(dict(state))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_restart_resumes_bit_identically(name: str) -> None:
    uninterrupted = OPTIMIZERS[name]()
    x = initial_state()
    for r in range(5):
        x = run_round(uninterrupted, x, r, SCHEDULE[r])

    first = OPTIMIZERS[name]()
    y = initial_state()
    for r in range(3):
        y = run_round(first, y, r, SCHEDULE[r])
    saved_model, saved_opt = checkpoint_bytes(y), checkpoint_bytes(first.state_dict())
    del first
    resumed = OPTIMIZERS[name]()
    resumed.load_state_dict(load(saved_opt))
    y = load(saved_model)
    for r in range(3, 5):
        y = run_round(resumed, y, r, SCHEDULE[r])
    for key in x:
        assert torch.equal(x[key], y[key]), f"{name}: {key} differs after the restart"
    assert checkpoint_bytes(resumed.state_dict()) == checkpoint_bytes(uninterrupted.state_dict())


def trained_state(name: str) -> State:
    strategy = OPTIMIZERS[name]()
    run_round(strategy, initial_state(), 0, ("enc", "head"))
    return strategy.state_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.__setitem__("m/enc.weight", s["m/enc.weight"].double()), "m/enc.weight"),
        (lambda s: s["m/enc.bias"].__setitem__(0, float("nan")), "m/enc.bias"),
        (lambda s: s["v/head.weight"].__setitem__(0, -1.0), "v/head.weight"),
        (lambda s: s.__setitem__("steps/enc", torch.tensor(-1)), "steps/enc"),
        (lambda s: s.__setitem__("steps/enc", torch.tensor(1.0)), "steps/enc"),
        (lambda s: s.__setitem__("bogus", torch.zeros(1)), "bogus"),
        (lambda s: s.pop("v/enc.bias"), "enc.bias"),
        (lambda s: s.__setitem__("v/enc.bias", torch.ones(5)), "v/enc.bias"),
    ],
)
def test_bad_state_is_refused_naming_the_key(
    mutate: Callable[[State], object], message: str
) -> None:
    state = trained_state("fedadam")
    mutate(state)
    fresh = OPTIMIZERS["fedadam"]()
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        fresh.load_state_dict(state)
    assert fresh.state_dict() == {}, "a refused state must not be half-loaded"


def test_state_of_another_model_is_refused_at_the_next_round() -> None:
    state = trained_state("fedyogi")
    state["m/enc.weight"] = torch.zeros(5, 3)
    state["v/enc.weight"] = torch.ones(5, 3)
    strategy = OPTIMIZERS["fedyogi"]()
    strategy.load_state_dict(state)
    with pytest.raises(ValueError, match=r"enc\.weight.*\(5, 3\).*\(4, 3\)"):
        run_round(strategy, initial_state(), 1, ("enc",))


def test_peak_bytes_counts_the_moments() -> None:
    inner = WeightedMeanStrategy()
    model = 1_000_000
    base = inner.peak_bytes(model, 10)
    assert FedAvgM(inner).peak_bytes(model, 10) == base + model
    for cls in (FedAdagrad, FedAdam, FedYogi):
        assert cls(inner).peak_bytes(model, 10) == base + 2 * model


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvgM(WeightedMeanStrategy(), momentum=1.0),
        lambda: FedAvgM(WeightedMeanStrategy(), server_lr=0.0),
        lambda: FedAdam(WeightedMeanStrategy(), beta1=1.0),
        lambda: FedYogi(WeightedMeanStrategy(), beta2=-0.1),
        lambda: FedAdagrad(WeightedMeanStrategy(), tau=0.0),
        lambda: FedAdam(WeightedMeanStrategy(), server_lr=float("nan")),
    ],
)
def test_bad_hyperparameters_are_refused(make: Callable[[], ServerOptimizer]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


def test_instructions_come_from_the_inner_strategy() -> None:
    strategy = FedAdam(WeightedMeanStrategy(proximal_mu=0.01))
    assert strategy.configure_round(3).proximal_mu == 0.01


def test_finish_before_begin_is_an_error() -> None:
    strategy = FedAdam(WeightedMeanStrategy())
    agg = WeightedMeanStrategy().begin_round(initial_state(), module_of_prefix)
    with pytest.raises(RuntimeError, match="before begin_round"):
        strategy.finish_round(initial_state(), agg.result())


def test_checkpoint_bytes_are_safetensors() -> None:
    data = checkpoint_bytes(trained_state("fedavgm"))
    assert set(load(io.BytesIO(data).getvalue())) == {
        "m/enc.weight",
        "m/enc.bias",
        "m/head.weight",
        "steps/enc",
        "steps/head",
    }


def test_optimizers_are_strategies() -> None:
    """Static (mypy) and runtime check that every optimizer fits the Strategy protocol."""
    strategies: list[Strategy] = [make() for make in OPTIMIZERS.values()]
    assert sorted(s.name for s in strategies) == sorted(OPTIMIZERS)
    aggregator: RoundAggregator = strategies[0].begin_round(initial_state(), module_of_prefix)
    assert aggregator.num_updates == 0
