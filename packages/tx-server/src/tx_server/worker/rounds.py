"""Split one claim into rounds that keep every model's order and fuse across models.

A claim taken ``through_barriers`` (:meth:`~tx_server.work_queue.WorkQueue.claim_pending`) may
hold a model's pipelined backlog — ``fb1, opt1, fb2, opt2, …`` — next to other models'. A
model's requests split into *segments*: the passes up to and including its next barrier.
Round ``r`` holds every model's ``r``-th segment. Running the rounds one after the other, and
within a round all passes before any barrier, executes each model's requests in arrival order
(a barrier is the last request of its segment), while the passes of every model in a round
still fuse into one engine call and their optimizer steps into another. Models are
independent, so how their segments line up across rounds changes no result.

With ``max_models``, a segment that would make a round use more models than that starts in a
later round instead: a round's runs must all hold an adapter slot at once
(:mod:`.engines` parks the others), and an engine has ``max_lora_adapters`` of them. Runs that
hold a slot now take the first rounds' places: with one run more than slots in a claim, only
that run waits for a later round (and parks one that is done), instead of a run that had a
slot being parked for it in round one and restored, parking another, in round two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tx_server.work_queue import ClaimedRequest

__all__ = ["plan_rounds"]


def plan_rounds(
    requests: Sequence[ClaimedRequest],
    max_models: int | None = None,
    loaded: Callable[[str], bool] | None = None,
) -> list[list[ClaimedRequest]]:
    """``requests`` (claim order) as rounds of at most ``max_models`` models each; each round
    keeps the claim's order, except that the models ``loaded`` says hold a slot come first."""
    if loaded is not None:  # a stable sort: each model's own order is kept
        requests = sorted(requests, key=lambda r: r.model_id is not None and not loaded(r.model_id))
    rounds: list[list[ClaimedRequest]] = []
    models: list[set[str]] = []  # of each round
    next_round: dict[str, int] = {}  # where a model's next segment may start
    open_round: dict[str, int] = {}  # the round of a model's segment not closed by a barrier
    for req in requests:
        key = req.model_id if req.model_id is not None else req.request_id
        r = open_round.get(key)
        if r is None:
            r = next_round.get(key, 0)
            while max_models is not None and r < len(rounds) and len(models[r]) >= max_models:
                r += 1
            open_round[key] = r
        if r == len(rounds):
            rounds.append([])
            models.append(set())
        rounds[r].append(req)
        models[r].add(key)
        if req.barrier:
            del open_round[key]
            next_round[key] = r + 1
    return rounds
