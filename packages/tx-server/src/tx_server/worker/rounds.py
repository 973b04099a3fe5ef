"""Split one claim into rounds that keep every model's order and fuse across models.

A claim taken ``through_barriers`` (:meth:`~tx_server.work_queue.WorkQueue.claim_pending`) may
hold a model's pipelined backlog — ``fb1, opt1, fb2, opt2, …`` — next to other models'. A
model's requests split into *segments*: the passes up to and including its next barrier.
Round ``r`` holds every model's ``r``-th segment. Running the rounds one after the other, and
within a round all passes before any barrier, executes each model's requests in arrival order
(a barrier is the last request of its segment), while the passes of every model in a round
still fuse into one engine call and their optimizer steps into another. Models are
independent, so how their segments line up across rounds changes no result.
"""

from __future__ import annotations

from collections.abc import Sequence

from tx_server.work_queue import ClaimedRequest

__all__ = ["plan_rounds"]


def plan_rounds(requests: Sequence[ClaimedRequest]) -> list[list[ClaimedRequest]]:
    """``requests`` (claim order) as rounds; each round keeps the claim's order."""
    rounds: list[list[ClaimedRequest]] = []
    next_round: dict[str, int] = {}
    for req in requests:
        key = req.model_id if req.model_id is not None else req.request_id
        r = next_round.get(key, 0)
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(req)
        if req.barrier:
            next_round[key] = r + 1
    return rounds
