"""Hostile clients against what the server aggregates: a poisoned update (every weight 3e38),
poisoned projections (1e300, finite in float64, Inf in float32) and another client's
upload_id, each sent by an enrolled client through the real TLS server. The model and the
prototypes stay finite and bounded, honest clients carry on, a restart starts cleanly."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors

from tests.support.reliability.attack_harness import (
    attack_server,
    record_attack,
    wait_for,
    wait_train,
)
from tests.support.reliability.reliability_harness import projection_payload

RATIO = 0.5  # update_bound.max_norm_ratio of the default config
MIN_REFERENCE_NORM = 1.0  # server/update_bound.py: the bound of a model with a smaller norm


def _shifted(state: dict[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    return {k: v + delta if v.is_floating_point() else v.clone() for k, v in state.items()}


def _norm(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor] | None = None) -> float:
    total = 0.0
    for key, value in state.items():
        if value.is_floating_point():
            diff = value.double() - (other[key].double() if other is not None else 0.0)
            total += float(diff.pow(2).sum())
    return math.sqrt(total)


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_an_update_of_3e38_everywhere_is_clipped_and_cannot_kill_the_run(tmp_path: Path) -> None:
    with attack_server(tmp_path, rounds=3, min_clients=2) as srv:
        honest = srv.client("honest", 1)  # 5 samples
        attacker = srv.client("attacker", 40)  # 83 samples: most of eq. 15's weight
        for c in (honest, attacker):
            c.register()
        for c in (honest, attacker):
            wait_train(c, 1)
        start = honest.download(1)
        assert honest.upload(1, _shifted(start, 0.01)).accepted
        poison = {
            k: torch.full_like(v, 3.0e38) if v.is_floating_point() else v for k, v in start.items()
        }
        reply = attacker.upload(1, poison)
        assert reply.accepted, reply.message  # folded in, clipped to the bound
        wait_for(lambda: srv.engine.run.last_committed_round >= 1, 30, "round 1 committed")
        model = srv.engine.global_state
        assert _finite(model)
        moved = _norm(model, start)
        assert moved <= RATIO * max(_norm(start), MIN_REFERENCE_NORM) * 1.001
        clipped = [
            e for e in srv.engine.store.events_after(0, 10_000) if e.kind == "update_clipped"
        ]
        assert [e.client_id for e in clipped] == ["attacker"]
        # the federation goes on: the honest client's next update is accepted
        wait_train(honest, 2)
        assert honest.upload(2, _shifted(honest.download(2), 0.01)).accepted
        srv.restart()  # and a restart starts cleanly from the committed model
        assert srv.engine.run.last_committed_round >= 1 and _finite(srv.engine.global_state)
    record_attack(
        "poisoned_update",
        "a selected client uploads every float weight as 3.0e38 (finite) with the largest "
        "sample count of the round",
        "update clipped to the norm bound (event update_clipped, metric "
        "crossfed_updates_clipped), global model finite, honest clients go on, restart clean",
        f"accepted scaled by {clipped[0].values['scale']:.2g}; round 1 moved the model "
        f"{moved:.3g} (bound {RATIO} x {_norm(start):.3g}); honest round-2 upload accepted; "
        "restarted on the same state dir",
    )


def test_projections_of_1e300_are_bounded_and_the_prototypes_stay_finite(
    tmp_path: Path,
) -> None:
    with attack_server(tmp_path, rounds=3, min_clients=2) as srv:
        honest = srv.client("honest", 1)
        attacker = srv.client("attacker", 2)
        for c in (honest, attacker):
            c.register()
        for c in (honest, attacker):
            wait_train(c, 1)
        c, dt, di = 3, 16, 8
        poison = encode_tensors(
            {
                "text_sum": torch.full((c, dt), 1e300, dtype=torch.float64),
                "image_sum": torch.full((c, di), -1e300, dtype=torch.float64),
                "text_count": torch.ones(c),
                "image_count": torch.ones(c),
            }
        )
        attacker.exchange(1, poison)  # declares the mandated noise: taken, rows clipped
        honest.exchange(1, projection_payload(1))
        start = honest.download(1)
        for client in (honest, attacker):
            assert client.upload(1, _shifted(start, 0.01)).accepted
        wait_for(lambda: srv.engine.run.last_committed_round >= 1, 30, "round 1 committed")
        wait_train(honest, 2)
        reply = honest.exchange(2, projection_payload(1))
        assert reply.prototypes_round == 1
        prototypes = decode_tensors(bytes(reply.global_prototypes.safetensors))
        assert _finite(prototypes)
        largest = max(float(v.abs().max()) for v in prototypes.values())
        accepted = [
            e
            for e in srv.engine.store.events_after(0, 10_000)
            if e.kind == "projections_accepted" and e.client_id == "attacker"
        ]
        assert accepted and accepted[0].values["clipped_rows"] == 6
        # each attacker row was clipped to C + sigma C (sqrt(d) + 8) <= 61 (d = 16)
        assert largest < 100
    record_attack(
        "poisoned_projections",
        "a client sends per-class projections of +-1e300 (finite in float64, Inf in float32)",
        "rows clipped to count x (C + noise tail); published prototypes finite",
        f"6 rows clipped; prototypes of round 1 finite, largest value {largest:.3g}",
    )


def test_another_clients_upload_id_does_not_shadow_an_update(tmp_path: Path) -> None:
    with attack_server(tmp_path, rounds=2, min_clients=2) as srv:
        first = srv.client("first", 1)  # 5 samples
        second = srv.client("second", 2)  # 7 samples
        for c in (first, second):
            c.register()
        for c in (first, second):
            wait_train(c, 1)
        start = first.download(1)
        one = first.upload(1, _shifted(start, 0.01), upload_id="same-id")
        two = second.upload(1, _shifted(start, -0.01), upload_id="same-id")
        assert one.accepted and not one.duplicate
        assert two.accepted and not two.duplicate, two.message
        wait_for(lambda: srv.engine.run.last_committed_round >= 1, 30, "round 1 committed")
        model = srv.engine.global_state
        want = _shifted(start, 0.01 * (5 - 7) / 12)  # eq. 15 over both updates
        assert all(torch.allclose(model[k], want[k], atol=1e-6) for k in want)
        committed = [r for r in srv.engine.store.list_rounds() if r.state == "committed"]
        assert committed[0].received == 2
    record_attack(
        "foreign_upload_id",
        "a client uploads its update under the upload_id another client used in the round",
        "both updates counted (upload ids are per client)",
        f"both accepted, not duplicate; round 1 averaged {committed[0].received} updates",
    )
