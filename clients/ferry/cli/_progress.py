"""A progress bar on stderr, drawn only when stderr is a terminal (rich)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["Bar", "open_bar"]


class Bar:
    """One transfer's bar."""

    def __init__(self, label: str) -> None:
        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task: TaskID | None = None
        self._label = label
        self._open = False

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes."""
        if self._task is None:
            self._progress.start()
            self._open = True
            self._task = self._progress.add_task(self._label, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        """Stop drawing (idempotent)."""
        if self._open:
            self._progress.stop()
            self._open = False


def open_bar(label: str) -> Bar | None:
    """A bar if stderr is a terminal, else None (no escape codes into logs or pipes)."""
    return Bar(label) if sys.stderr.isatty() else None
