"""Resource figures of a process under attack, for bounds in tests; and waiting for them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil
import pytest


def wait_for(what: str, check: Callable[[], bool], within: float, poll: float = 0.05) -> None:
    """Poll ``check`` until it is true; fail the test, naming ``what``, after ``within`` s."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(poll)


class Peak:
    """The largest RSS and descriptor count of a process, sampled until it exits."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.rss = 0
        self.fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.rss = max(self.rss, self._proc.memory_info().rss)
                self.fds = max(self.fds, self._proc.num_fds())
            except psutil.Error:  # exited
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
