"""Training that arrives while a sampling batch decodes runs between two of its decode steps.

Why: the worker executes one claim at a time, and a claim's sampling batch of long rollouts can
decode for seconds or minutes. Without breaks, a ``forward_backward`` or ``optim_step`` that
arrives meanwhile waits for the whole batch: in an RL loop where one tenant trains while others
sample, every training step would take as long as someone else's longest rollout.

How: :class:`TrainingBreaks` is the sampler's :class:`~tx_engine.sampler.Interruption`. Before
each decode step it reads the work subscription without blocking. A submission that names a
model (training, saves, loads; sampling requests name none) makes a break *wanted*. A break
claims the pending requests of every type but ``sample`` (each model's order kept, as in the
main loop) and executes them like any claim: passes of all tenants fused, then optimizer steps.
The sampler then re-reads the engine's state and decodes on. The sampler slots of the batch
are pinned meanwhile (:meth:`~tx_server.worker.slots.SamplerSlots.pinned`), so a slot the
training allocates never evicts weights the batch is reading.

Fairness: ``share`` (setting ``training_share_while_sampling``, default one half) is the part of
the time breaks may take. After a break of ``t`` seconds, the batch decodes for at least
``t·(1-share)/share`` seconds before the next one (as long again, at one half). So while both
kinds wait, they split the device in that ratio; training that arrives after a stretch of
sampling alone waits one decode step; a steady stream of training never stalls sampling, and a
long stretch of sampling builds up no credit that training could later spend in one burst.
Training that gets no break before the batch ends runs right after it, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from tx_server.wake import SyncSubscription
from tx_server.work_queue import ClaimedRequest

__all__ = ["TrainingBreaks"]

log = logging.getLogger(__name__)


class TrainingBreaks:
    """Runs the training that was submitted during one sampling batch, between decode steps.

    ``claim`` takes pending non-sampling requests; ``execute`` runs them to completion.
    ``wanted``: a break is wanted from the start. Pass True when the claim held training: a
    model's next request (say the ``optim_step`` after a claimed ``forward_backward``) may
    already be waiting, its wake-up consumed while the claim was gathered.
    An exception from either stops further breaks and is re-raised by :meth:`raise_failure`
    once the sampling batch is done, so it surfaces as it would from the main loop.
    """

    def __init__(
        self,
        work: SyncSubscription,
        claim: Callable[[], list[ClaimedRequest]],
        execute: Callable[[Sequence[ClaimedRequest]], None],
        share: float,
        wanted: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._work, self._claim, self._execute = work, claim, execute
        self.share, self._clock = share, clock
        self._next_at = clock()  # when the next break may run
        self._wanted = wanted
        self._failure: BaseException | None = None
        self.breaks = 0
        """Breaks that claimed and ran something."""

    def due(self) -> bool:
        """A model's request was submitted, and the batch decoded long enough since the last
        break."""
        if self._failure is not None or self.share <= 0:
            return False
        if not self._wanted:
            self._wanted = any(self._work.wait(timeout=0.0))  # "" = a sampling request
        return self._wanted and self._clock() >= self._next_at

    def run(self) -> None:
        """Claim and execute what is pending; a failure is kept for :meth:`raise_failure`."""
        self._wanted = False
        start = self._clock()
        try:
            claimed = self._claim()
            if claimed:
                log.info("%d requests run between decode steps of a sampling batch", len(claimed))
                self._execute(claimed)
                self.breaks += 1
        except Exception as exc:
            self._failure = exc
        finally:
            end = self._clock()
            self._next_at = end + (end - start) * (1 - self.share) / self.share

    def raise_failure(self) -> None:
        """Re-raise what a break raised (call once the sampling batch is over)."""
        if self._failure is not None:
            raise self._failure
