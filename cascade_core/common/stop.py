"""Ctrl-C as a request to stop: the command line's runs and the headless client end cleanly at the first,
at once at the second. Standard library only."""
from __future__ import annotations

import signal


class StopRequest:
    """While active, the first SIGINT makes ``self()`` true (the run stops before its next tick) and a
    second raises KeyboardInterrupt. Only in the main thread (elsewhere it does nothing)."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt("a second Ctrl-C stopped the run at once; what was written is finalised")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def __call__(self) -> bool:
        return self.requested
