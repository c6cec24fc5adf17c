"""Ctrl-C during training: the first one stops the loop after the step in progress, which is then
checkpointed, so an interrupted run resumes bit-identically; a second one stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = ["DeferredInterrupt"]


class DeferredInterrupt:
    """SIGINT handler for the loop: the first Ctrl-C asks the loop to stop after the step in
    progress (checkpointed); a second one raises KeyboardInterrupt at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self.log = log

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\ninterrupt: finishing the current step, then checkpointing (Ctrl-C again to stop at once)")

    @contextlib.contextmanager
    def installed(self, enabled: bool = True) -> Iterator[DeferredInterrupt]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers live in the main thread (and a multi-process run stops at once)
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
