"""ExchangeProjections against the run (eq. 16): which round a client's release may belong to,
and its admission into the pending sums (server/projection_desk.py) that the next commit
publishes as global prototypes. A release is accepted for the open training round from its
selected clients, and for the just-committed round from its uploaders (clients exchange after
uploading); the calibration round exchanges none.
"""

from __future__ import annotations

import math

import torch
from crossfed.common.privacy.projection_dp import ProjectionDPParams
from crossfed.server.client_registry import ClientRegistry
from crossfed.server.errors import NotSelectedError, ServerError, WrongRoundError
from crossfed.server.projection_desk import ProjectionDesk, ProjectionReply
from crossfed.server.round_board import RoundBoard


class ProjectionIntake:
    """Takes clients' projection releases for the right round, counted before use."""

    def __init__(
        self,
        board: RoundBoard,
        registry: ClientRegistry,
        desk: ProjectionDesk,
    ) -> None:
        self.board = board
        self.registry = registry
        self.desk = desk

    def exchange(
        self,
        client_id: str,
        round_no: int,
        payload: bytes,
        epsilon_spent: float = 0.0,
        mechanism: ProjectionDPParams | None = None,
    ) -> ProjectionReply:
        """Add a client's projection payload (if any) to the pending sums; return the latest
        published global prototypes, (0, b"") before the first. The payload is bounded and
        checked against the privacy mandate (``mechanism``: what the client declares it
        applied); its epsilon is the server's count, ``epsilon_spent`` (the client's own
        figure) is only recorded beside it."""
        board = self.board
        with board.lock:
            client = self.registry.known(client_id)
            self.registry.touch(client, board.clock())
            registered = client.num_samples
        if payload:
            projections = self.desk.decode(payload)
            with board.lock:
                self._check_round(client_id, round_no)
                fresh = self.desk.is_fresh(client_id, round_no)
            if fresh:  # a repeat is ignored, and not counted twice
                self._take(client_id, round_no, projections, registered, mechanism, epsilon_spent)
        with board.lock:
            return self.desk.reply(client_id, self.board.epsilon_budget)

    def _take(
        self,
        client_id: str,
        round_no: int,
        projections: dict[str, torch.Tensor],
        registered: int,
        mechanism: ProjectionDPParams | None,
        reported_epsilon: float,
    ) -> None:
        """Bound, admit (mandate, noise, budget: counted before use) and add one release."""
        board = self.board
        try:
            release = self.desk.admit(
                client_id, projections, registered, mechanism, self.board.epsilon_budget
            )
        except ServerError as exc:
            board.events.append("projections_refused", round_no, client_id, str(exc))
            raise
        with board.lock:
            self._check_round(client_id, round_no)
            if not self.desk.add(client_id, round_no, release):
                return
            if release.epsilon > board.run.epsilon_spent:  # the run's: the largest client's
                board.run.epsilon_spent = release.epsilon
                board.store.put_run(board.run)
            values = {"epsilon_spent": release.epsilon, "clipped_rows": float(release.clipped_rows)}
            if math.isfinite(reported_epsilon):
                values["client_reported_epsilon"] = reported_epsilon
            board.events.append("projections_accepted", round_no, client_id, values=values)

    def _check_round(self, client_id: str, round_no: int) -> None:
        board = self.board
        board.require_active()
        current = board.open or (board.closing.attempt if board.closing else None)
        if current is not None and current.record.round == round_no:
            if current.is_calibration:
                raise WrongRoundError(
                    f"round {round_no} is the calibration round; it exchanges no projections"
                )
            if client_id not in current.record.selected:
                raise NotSelectedError(
                    f"client {client_id!r} was not selected for round {round_no}"
                )
            return
        last = board.run.last_committed_round
        if 0 < last == round_no and self.registry.records[client_id].last_round == last:
            return  # an uploader of the just-committed round (there is none before round 1)
        raise WrongRoundError(
            f"projections for round {round_no} are not accepted now (open round: "
            f"{current.record.round if current else 'none'}, last committed: {last})"
        )
