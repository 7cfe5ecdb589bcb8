"""Resource figures of a process under attack, for bounds in tests."""

from __future__ import annotations

import threading

import psutil


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
