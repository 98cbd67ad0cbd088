"""Plain-text progress of long training calls: a line at every tenth of the work, with the time so far.

Rich's live bars draw nothing while the output is not a terminal (``dvc repro`` under the Prefect
flow, a CI log, ``| tee``), and on 32x32 photographs the train, filter and evaluate stages each
train for minutes to tens of minutes: without these lines such a run looks hung. A training loop
calls :func:`advance` after each step; inside ``with milestones(label, total)`` that prints
``label: 40% of N network-steps, 2 min 5 s`` as each tenth is crossed, and outside one it does
nothing (tests, the sampler). The generator's trainer, which knows its step, calls
:meth:`Milestones.reach` on one it holds.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from typing import Iterator, TextIO

_ACTIVE: contextvars.ContextVar["Milestones | None"] = contextvars.ContextVar("synthgen_milestones", default=None)


def duration(seconds: float) -> str:
    """'42 s', '3 min 5 s', '1 h 2 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Milestones:
    """Counts units of work (network-steps: one step of one network) towards ``total`` and prints each tenth crossed."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, parts: int = 10, unit: str = "network-steps",
                 done: int = 0):
        self.label, self.total, self.parts, self.unit = label, max(1, int(total)), parts, unit
        self.stream = stream if stream is not None else sys.stdout
        self.done, self.started = int(done), time.perf_counter()
        self.printed = self._tenths()  # a resumed run starts where it was, without lines for the work done before
        self._lock = threading.Lock()  # networks trained side by side advance one count

    def _tenths(self) -> int:
        return min(self.parts, self.done * self.parts // self.total)  # integer: no float drift

    def advance(self, units: int = 1) -> None:
        with self._lock:
            self._report(self.done + units)

    def reach(self, done: int) -> None:
        """``done`` units of work finished in all (a training loop that knows its step)."""
        with self._lock:
            self._report(done)

    def _report(self, done: int) -> None:
        self.done = int(done)
        reached = self._tenths()
        if reached > self.printed:
            self.printed = reached
            elapsed = duration(time.perf_counter() - self.started)
            print(f"{self.label}: {100 * reached // self.parts}% of {self.total} {self.unit}, {elapsed}", file=self.stream, flush=True)


@contextlib.contextmanager
def milestones(label: str, total: int, enabled: bool = True, stream: TextIO | None = None) -> Iterator[Milestones | None]:
    """Within the block, :func:`advance` counts towards ``total`` (nothing when ``enabled`` is false)."""
    if not enabled:
        yield None
        return
    reporter = Milestones(label, total, stream)
    token = _ACTIVE.set(reporter)
    try:
        yield reporter
    finally:
        _ACTIVE.reset(token)


def advance(units: int = 1) -> None:
    """``units`` more network-steps done, for the enclosing :func:`milestones` block if there is one."""
    reporter = _ACTIVE.get()
    if reporter is not None:
        reporter.advance(units)
