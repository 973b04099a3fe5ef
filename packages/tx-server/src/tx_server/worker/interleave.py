"""What arrives while a sampling batch decodes runs between two of its decode steps.

Why: the worker executes one claim at a time, and a claim's sampling batch of long rollouts can
decode for seconds or minutes. Without breaks, a ``forward_backward`` or ``optim_step`` that
arrives meanwhile waits for the whole batch: in an RL loop where one tenant trains while others
sample, every training step would take as long as someone else's longest rollout. So would
another tenant's sample request, even once rows of the batch had finished and stood idle.

How: :class:`DecodeBreaks` is the sampler's :class:`~tx_engine.sampler.Interruption`. Before
each decode dispatch (of up to ``sample_decode_chunk`` steps) it reads the work subscription
without blocking. A submission that names a
model (training, saves, loads) makes a *training break* wanted; a sampling submission (which
names none) makes a *join* wanted.

* A join claims at most as many pending sample requests as the batch has free decode rows, or
  rows it may grow by within the cache budget, and adds them to the running engine call
  (:meth:`SamplingRunner.join_pending`): they take those rows (else rows as rows free up), are
  answered when their own samples end, and need no new batch. A request that does not fit
  the batch (a longer cache, another base model, a higher adapter rank) runs after it in the
  same claim.
* A training break claims the pending requests of every type but ``sample`` (each model's
  order kept, as in the main loop) and executes them like any claim: passes of all tenants
  fused, then optimizer steps.

The sampler then re-reads the engine's state and decodes on. The sampler slots of the batch
are pinned meanwhile (:meth:`~tx_server.worker.slots.SamplerSlots.pinned`), so a slot the
training allocates never evicts weights the batch is reading.

Fairness: ``share`` (setting ``training_share_while_sampling``, default one half) is the part of
the time training breaks may take. After one of ``t`` seconds, the batch decodes for at least
``t·(1-share)/share`` seconds before the next (as long again, at one half). So while both
kinds wait, they split the device in that ratio; training that arrives after a stretch of
sampling alone waits one decode step; a steady stream of training never stalls sampling, and a
long stretch of sampling builds up no credit that training could later spend in one burst.
Training that gets no break before the batch ends runs right after it, as before. Joins take
no share: they fill rows that would otherwise idle, or add rows to the batch, which costs the
batch little on an accelerator (decode reads the weights once for all rows) and serves the
joiner at once instead of after the whole batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from tx_server.wake import SyncSubscription
from tx_server.work_queue import ClaimedRequest

__all__ = ["DecodeBreaks"]

log = logging.getLogger(__name__)


class DecodeBreaks:
    """Runs the training, and joins the samples, submitted during one sampling batch.

    ``claim`` takes pending non-sampling requests and ``execute`` runs them to completion.
    ``room`` is how many sample requests a join would start now (free decode rows, or rows
    the batch may grow by) and ``join(n)`` claims up to ``n`` of them into the batch,
    returning how many it claimed.
    ``training_wanted``: a training break is wanted from the start. Pass True when the claim
    held training: a model's next request (say the ``optim_step`` after a claimed
    ``forward_backward``) may already be waiting, its wake-up consumed while the claim was
    gathered. An exception from any of these stops further breaks and is re-raised by
    :meth:`raise_failure` once the sampling batch is done, as it would from the main loop.
    """

    def __init__(
        self,
        work: SyncSubscription,
        claim: Callable[[], list[ClaimedRequest]],
        execute: Callable[[Sequence[ClaimedRequest]], None],
        share: float,
        room: Callable[[], int] = lambda: 0,
        join: Callable[[int], int] = lambda _: 0,
        training_wanted: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._work, self._claim, self._execute = work, claim, execute
        self._room, self._join = room, join
        self.share, self._clock = share, clock
        self._next_at = clock()  # when the next training break may run
        self._training_wanted = training_wanted
        self._join_wanted = False
        self._failure: BaseException | None = None
        self.breaks = 0
        """Training breaks that claimed and ran something."""
        self.joined = 0
        """Sample requests claimed into the batch."""

    def due(self) -> bool:
        """A model's request was submitted and the batch decoded long enough since the last
        training break, or a sample request was submitted and the batch has room for rows."""
        if self._failure is not None:
            return False
        for message in self._work.wait(timeout=0.0):
            if message:
                self._training_wanted = True
            else:  # "": a sampling submission
                self._join_wanted = True
        return self._training_due() or (self._join_wanted and self._room() > 0)

    def run(self) -> None:
        """Join waiting samples and run waiting training, as due; a failure is kept for
        :meth:`raise_failure`."""
        try:
            room = self._room() if self._join_wanted else 0
            if room > 0:
                claimed = self._join(room)
                self.joined += claimed
                self._join_wanted = claimed >= room  # more may wait for the next free rows
            if self._training_due():
                self._train()
        except Exception as exc:
            self._failure = exc

    def raise_failure(self) -> None:
        """Re-raise what a break raised (call once the sampling batch is over)."""
        if self._failure is not None:
            raise self._failure

    def _training_due(self) -> bool:
        return self.share > 0 and self._training_wanted and self._clock() >= self._next_at

    def _train(self) -> None:
        self._training_wanted = False
        start = self._clock()
        try:
            claimed = self._claim()
            if claimed:
                log.info("%d requests run between decode steps of a sampling batch", len(claimed))
                self._execute(claimed)
                self.breaks += 1
        finally:
            end = self._clock()
            self._next_at = end + (end - start) * (1 - self.share) / self.share
