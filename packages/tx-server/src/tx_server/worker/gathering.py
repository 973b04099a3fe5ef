"""When a claim with sampling requests waits for followers, and when it starts at once.

The cookbook sends an RL group as one ``sample`` request per rollout, all at once, and they
reach the database one after another (the API inserts them in turn: spread over ~10 ms for 4
requests on a 2-core host, up to 80 ms for 8, which a 5 ms gap still splits). Woken by the
first, the worker would run it alone and the rest as a second batch: two decode loops instead
of one, no shared prefill, and a compile for every new way of splitting the group. So a claim
with sampling requests first gathers what is submitted right after it
(:func:`gather_followers`).

A client that samples one request at a time (an evaluation loop, a chat) has no followers,
and each of its requests would pay the whole gap for nothing. :class:`LoneSessions` learns
which sampling sessions do that and lets their claims start at once.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from datetime import UTC

from tx_server.futures import RequestType
from tx_server.wake import SyncSubscription
from tx_server.work_queue import ClaimedRequest, WorkQueue
from tx_server.worker.executor import HANDLED_TYPES

__all__ = ["GATHER_GAPS", "LoneSessions", "claim", "gather_followers", "sample_requests"]

GATHER_GAPS = 4


def claim(queue: WorkQueue, limit: int) -> list[ClaimedRequest]:
    """Every runnable request the worker handles, up to ``limit``, through barriers."""
    return queue.claim_pending(limit=limit, request_types=HANDLED_TYPES, through_barriers=True)


def gather_followers(
    queue: WorkQueue, work: SyncSubscription, gap: float, limit: int
) -> list[ClaimedRequest]:
    """What is submitted within ``gap`` s of the last submission (at most ``GATHER_GAPS``
    gaps), claimed to run with a claim that holds sampling requests.

    A lone request pays one ``gap``. Order stays safe: a model with a request of the first
    claim still running gives nothing to these claims (``claim_pending``).
    """
    more: list[ClaimedRequest] = []
    deadline = time.monotonic() + GATHER_GAPS * gap
    while len(more) < limit and (left := deadline - time.monotonic()) > 0:
        if not work.wait(timeout=min(gap, left)):
            break
        more += claim(queue, limit - len(more))
    return more


class LoneSessions:
    """Sampling sessions whose client waits for each answer before it sends the next request.

    A session's request is *sequential* when it was created after the worker answered the
    session's previous claim, *concurrent* when it was created before, or was claimed or
    gathered with another request of the session: a group in flight. After :attr:`LONE_AFTER`
    sequential requests, a session that never sent a concurrent one counts as lone, and a claim
    whose sampling requests all belong to lone sessions skips the gather window. A session that
    ever sends a group gathers for good: RL loops sample one request at a time too (a first
    probe, an evaluation) between their groups, and a group claimed without its followers runs
    as two batches. The one group of a session that was lone until then may run so, once.
    Requests that join a running batch (:mod:`.interleave`) are answered with its claim: the
    rest of a lone session's group joining its first request's batch marks it grouped too
    (before, such a session stayed lone, and every one of its groups ran split).

    Creation times are the API's clock and answer times the worker's: on one host (or hosts
    with synchronised clocks) the comparison is exact enough; a skew only moves requests
    between the two classes, which changes how long a claim waits, never what it computes.
    """

    LONE_AFTER = 4
    """Sequential requests before a session counts as lone: enough that a client probing once
    or twice before it sends its groups (as tests and warm-ups do) never sees one split."""
    MAX_SESSIONS = 4096
    """Sessions remembered (least recently answered first out): an unknown session gathers."""

    def __init__(self) -> None:
        self._answered: OrderedDict[str, float] = OrderedDict()
        self._sequential: Counter[str] = Counter()
        self._grouped: set[str] = set()

    def skip_gather(self, samples: Sequence[ClaimedRequest]) -> bool:
        """Record the claimed ``samples``; whether all their sessions are lone."""
        by_session: dict[str, list[ClaimedRequest]] = {}
        for request in samples:
            by_session.setdefault(request.sampling_session_id or "", []).append(request)
        for session, requests in by_session.items():
            answered = self._answered.get(session)
            if len(requests) > 1 or (answered is not None and _created(requests[0]) <= answered):
                self._grouped.add(session)
            elif answered is not None:
                self._sequential[session] += 1
        return all(self._is_lone(s) for s in by_session)

    def answered(self, samples: Sequence[ClaimedRequest]) -> None:
        """The claim that held ``samples`` (gathered followers and requests that joined its
        batch included) has been run: their answers are out. A session with several requests
        in it sent them together."""
        now = time.time()
        for session, count in Counter(r.sampling_session_id or "" for r in samples).items():
            if count > 1:
                self._grouped.add(session)
            self._answered[session] = now
            self._answered.move_to_end(session)
        while len(self._answered) > self.MAX_SESSIONS:
            forgotten, _ = self._answered.popitem(last=False)
            self._sequential.pop(forgotten, None)
            self._grouped.discard(forgotten)

    def _is_lone(self, session: str) -> bool:
        return session not in self._grouped and self._sequential[session] >= self.LONE_AFTER


def sample_requests(claimed: Sequence[ClaimedRequest]) -> list[ClaimedRequest]:
    """The ``sample`` requests of a claim."""
    return [r for r in claimed if r.request_type == RequestType.SAMPLE]


def _created(request: ClaimedRequest) -> float:
    """Seconds since the epoch; the database hands back naive datetimes, stored in UTC."""
    created_at = request.created_at
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return created_at.timestamp()
