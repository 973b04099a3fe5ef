"""Host-memory tuning for processes that run the engine: transparent huge pages for malloc.

Why: XLA:CPU allocates every compiled call's large buffers (activations, temporaries) with
``malloc``. glibc serves chunks of 32 MB and more with a fresh ``mmap`` and unmaps them when
they are freed, so each training step faults its whole working set in again, 4 KiB at a time,
with the kernel zeroing every page. On the small preset (2 CPU cores) that was 0.4 GB per
step at 4×128 tokens (100 k page faults, 0.19 s of system time in a 0.64 s step) and 3.7 GB
at 8×512. Worse, the unmapping runs on XLA's threads after the call has returned, so it
also slowed the optimizer step that followed (31 → 21 ms).

``glibc.malloc.hugetlb=1`` makes malloc advise transparent huge pages on its mappings: 2 MiB
faults instead of 4 KiB ones. Measured with ``benchmarks/engine_train.py --presets small
--max-ranks 8 --iters 5``: steps 9–12 % faster at both shapes (MFU 55/52/54/54 % → 58/53/59/
61 %), peak RSS unchanged. Decode steps are 3–8 % faster.

The price is paid once per process: the first steps, while the heap grows, take longer
(the small preset's first 4×128 step after warm-up: 1.0 s instead of 0.55 s; the same step
without the tunable: 0.6 s).

Rejected: keeping freed memory instead (``mmap_max=0``, one arena, no trimming). It removed
the faults at 4×128, but a single heap fragments: peak RSS at 8×512 went from 2.9 to 4.5 GB.

The tunable is read by the dynamic loader when a process starts, so a process that runs the
engine re-executes itself once with it (:func:`reexec_with_tuned_malloc`, called first thing
by the server's worker, ``tx train`` and the benchmarks). Nothing happens off glibc Linux,
where the kernel has transparent huge pages disabled (then glibc ignores the advice), or when
``GLIBC_TUNABLES`` already says anything about ``glibc.malloc.hugetlb``: set
``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` to opt out.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["HUGETLB_TUNABLE", "reexec_with_tuned_malloc", "tuned_environ"]

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
_VARIABLE = "GLIBC_TUNABLES"


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with the tunable added, or None when there is nothing to add (see above)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    current = environ.get(_VARIABLE, "")
    if "glibc.malloc.hugetlb" in current:
        return None
    tuned = dict(environ)
    tuned[_VARIABLE] = f"{current}:{HUGETLB_TUNABLE}" if current else HUGETLB_TUNABLE
    return tuned


def reexec_with_tuned_malloc() -> None:
    """Replace this process by itself, same interpreter, arguments and pid, with the tunable
    set; return at once when it is set already or does not apply.

    Call it first thing in a program's entry point, before threads, open servers or output
    that would be lost: the process image is replaced, not forked.
    """
    environ = tuned_environ(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
