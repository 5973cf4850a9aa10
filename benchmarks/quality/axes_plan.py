"""The quality suite's extra axes (issue 18): which runs the strategy, attack and defaults
sweeps make. Each is a list of `Job`s (method x setup x `RunVariant`) in priority order --
seed by seed, so a sweep cut short by its deadline still holds whole tables for the seeds it
finished -- run by `quality.sweep.run_jobs` like the main grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from crossfed.simulation.byzantine import AttackKind
from crossfed.simulation.federation_data import FederationSetup
from quality.sweep import DEFAULT_VARIANT, Job, RunVariant, canonical

#: The strategy axis's pseudo-strategy: FedAvg aggregation with FedProx's client-side mu.
FEDPROX = "fedprox"
#: References for the strategy sweep: the central unimodal ceilings (one run per setup).
CENTRAL_REFERENCES = ("ceiling_text", "ceiling_image")


def strategy_variant(spec: str, proximal_mu: float) -> RunVariant:
    """The run variant a strategy axis entry stands for (``fedprox`` = fedavg + mu;
    ``name:key=value`` sets parameters, see `strategy_spec`)."""
    if spec == FEDPROX:
        return RunVariant(proximal_mu=proximal_mu)
    name, params = strategy_spec(spec)
    return RunVariant(strategy=name, strategy_params=params)


def variant_label(variant: RunVariant) -> str:
    """The strategy a variant ran, as the tables name it (fedprox for fedavg with mu)."""
    if variant.proximal_mu and variant.strategy == "fedavg":
        return f"{FEDPROX} (μ {variant.proximal_mu:g})"
    # krum_f is set from the attacker count, not chosen: it does not name a variant
    shown = [f"{k} {v:g}" for k, v in variant.strategy_params if k != "krum_f"]
    return variant.strategy + (f" ({', '.join(shown)})" if shown else "")


def strategy_spec(spec: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """``name`` or ``name:key=value:key=value`` (a strategy with its parameters, as the
    sweeps' ``--strategies`` list takes it)."""
    name, *pairs = spec.split(":")
    params = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key):
            raise ValueError(f"strategy {spec!r}: {pair!r} is not key=value")
        params.append((key, float(value)))
    return name, tuple(params)


@dataclass(frozen=True)
class StrategyPlan:
    """Per-client missingness at one alpha over rates, plus the headline cell (no-regression),
    each strategy running ours; central ceilings once per setup."""

    strategies: tuple[str, ...]
    rates: tuple[float, ...]
    alpha: float
    headline: FederationSetup  # its seed is ignored
    seeds: tuple[int, ...]
    clients: int
    proximal_mu: float

    def setups(self, seed: int) -> list[FederationSetup]:
        h = self.headline
        cells = [
            FederationSetup("per_client", r, self.alpha, self.clients, seed) for r in self.rates
        ]
        return [*cells, FederationSetup(h.missingness, h.rate, h.alpha, self.clients, seed)]

    def jobs(self) -> list[Job]:
        out: list[Job] = []
        for seed in self.seeds:
            for setup in self.setups(seed):
                for ref in CENTRAL_REFERENCES:
                    out.append(Job(canonical(setup, ref), ref, "strategies"))
                for name in self.strategies:
                    out.append(
                        Job(setup, "ours", "strategies", strategy_variant(name, self.proximal_mu))
                    )
        return _unique(out)


@dataclass(frozen=True)
class AttackPlan:
    """k of N clients attacking at the headline cell: every robust strategy (and FedAvg),
    clean and under each attack, running ours."""

    strategies: tuple[str, ...]
    attacks: tuple[AttackKind, ...]
    attackers: int
    setup: FederationSetup  # its seed is ignored
    seeds: tuple[int, ...]

    def jobs(self) -> list[Job]:
        out: list[Job] = []
        s = self.setup
        for seed in self.seeds:
            setup = FederationSetup(s.missingness, s.rate, s.alpha, s.clients, seed)
            for spec in self.strategies:
                name, params = strategy_spec(spec)
                if name in ("krum", "multi_krum"):  # Krum is told how many attackers to tolerate
                    params = (("krum_f", float(self.attackers)), *params)
                clean = RunVariant(strategy=name, strategy_params=params)
                out.append(Job(setup, "ours", "attacks", clean))
                for kind in self.attacks:
                    variant = replace(clean, attack=kind, attackers=self.attackers)
                    out.append(Job(setup, "ours", "attacks", variant))
        return _unique(out)


@dataclass(frozen=True)
class DefaultsPlan:
    """Training budgets (rounds x local epochs x lr) for ours with FedAvg at one setup, with
    the central references (paired upper bound, unimodal ceilings) for scale."""

    budgets: tuple[tuple[int, int, float], ...]  # (rounds, local epochs, lr)
    setup: FederationSetup  # its seed is ignored
    seeds: tuple[int, ...]

    def jobs(self) -> list[Job]:
        out: list[Job] = []
        s = self.setup
        for seed in self.seeds:
            setup = FederationSetup(s.missingness, s.rate, s.alpha, s.clients, seed)
            for ref in ("central_paired", *CENTRAL_REFERENCES):
                out.append(Job(canonical(setup, ref), ref, "defaults"))
            for rounds, epochs, lr in self.budgets:
                variant = RunVariant(rounds=rounds, local_epochs=epochs, lr=lr)
                out.append(Job(setup, "ours", "defaults", variant))
        return _unique(out)


def budget_grid(
    rounds: Sequence[int], epochs: Sequence[int], lrs: Sequence[float], max_epochs_total: int
) -> tuple[tuple[int, int, float], ...]:
    """Every (rounds, epochs, lr), cheapest first, pruned to rounds x epochs <= the cap (the
    sweep's time budget: a run costs about rounds x epochs local epochs per client)."""
    grid = [(r, e, lr) for r in rounds for e in epochs for lr in lrs if r * e <= max_epochs_total]
    return tuple(sorted(grid, key=lambda b: (b[0] * b[1], b[0], b[2])))


def _unique(jobs: list[Job]) -> list[Job]:
    seen: set[str] = set()
    out = []
    for job in jobs:
        if job.key() not in seen:
            seen.add(job.key())
            out.append(job)
    return out


__all__ = [
    "CENTRAL_REFERENCES",
    "DEFAULT_VARIANT",
    "FEDPROX",
    "AttackPlan",
    "DefaultsPlan",
    "StrategyPlan",
    "budget_grid",
    "strategy_variant",
    "variant_label",
]
