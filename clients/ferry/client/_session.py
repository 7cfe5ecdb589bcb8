"""The broker conversation around a data path: watching a session (re-subscribing
across broker restarts), running a blocking data path in a thread beside its watchers,
and the progress pump."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._events import (
    EventHandler,
    Progress,
)
from ferry.files import shown
from ferry.v1 import broker_pb2

__all__ = [
    "FINAL",
    "LIVE",
    "RESUBSCRIBE",
    "Pump",
    "State",
    "ended",
    "follow",
    "in_thread_while",
    "until_final",
    "watch",
]

PROGRESS_INTERVAL = 0.1
REPORT_INTERVAL = 1.0
State = broker_pb2.Session.State
RESUBSCRIBE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
)
LIVE = frozenset({State.STATE_ACCEPTED, State.STATE_CONNECTING, State.STATE_TRANSFERRING})
FINAL = frozenset(
    {
        State.STATE_COMPLETED,
        State.STATE_DECLINED,
        State.STATE_CANCELLED,
        State.STATE_FAILED,
        State.STATE_EXPIRED,
    }
)


@dataclass
class Pump:
    """Polls a thread's byte counter and feeds events and broker reports."""

    total: int
    handler: EventHandler | None
    read: Callable[[], int]
    report: Callable[[int], object] | None = None
    _last_report: float = field(default=0.0)

    async def run(self) -> None:
        last = -1
        while True:
            done = self.read()
            if done != last and self.handler is not None:
                self.handler(Progress(done, self.total))
            last = done
            now = time.monotonic()
            if self.report is not None and now - self._last_report >= REPORT_INTERVAL:
                self._last_report = now
                with contextlib.suppress(BrokerError):
                    await self.report(done)  # type: ignore[misc]
            await asyncio.sleep(PROGRESS_INTERVAL)


async def watch(link: BrokerLink, name: str, seconds: float) -> AsyncIterator[broker_pb2.Session]:
    """WatchSession for up to ``seconds``, re-subscribing while the broker is unreachable.

    A broker restart (or a lost connection) ends the stream with UNAVAILABLE; the session
    is durable on the broker, so the watch simply resumes once it answers again.
    """
    deadline = time.monotonic() + seconds
    pause = 0.1
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            async for session in link.watch(name, remaining):
                pause = 0.1
                yield session
                if session.state in FINAL:
                    return
        except BrokerError as exc:
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            # A broker shutting down cancels its streams; a restarting one is unavailable.
            if exc.code not in RESUBSCRIBE:
                raise
        # The stream ended before a final state: the broker restarted or went away.
        await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 2.0)


async def in_thread_while(
    work: Callable[[], object], cancel: threading.Event, *watchers: Coroutine[Any, Any, None]
) -> None:
    """Run blocking ``work`` in a thread beside ``watchers`` (which set ``cancel`` to stop it).

    However it ends (done, failed, or this task cancelled), ``cancel`` is set and the
    watchers are stopped, so no thread or task outlives the call.
    """
    tasks = [asyncio.create_task(w) for w in watchers]
    try:
        await asyncio.to_thread(work)
    finally:
        cancel.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def follow(
    link: BrokerLink,
    name: str,
    attempt: int,
    cancel: threading.Event,
    latest: list[broker_pb2.Session],
    on_session: Callable[[broker_pb2.Session], object] | None = None,
) -> None:
    """Set ``cancel`` once the session leaves ``attempt`` or ends; keep ``latest[0]`` current;
    show ``on_session`` every state of ``attempt`` (the other side's candidates come so)."""
    async for session in watch(link, name, 86400.0):
        if latest:
            latest[0] = session
        if session.attempt != attempt or session.state in FINAL:
            cancel.set()
            return
        if on_session is not None:
            on_session(session)


async def until_final(
    link: BrokerLink,
    name: str,
    cancel: threading.Event,
    moved: threading.Event,
    attempt: int | None,
) -> None:
    """Set ``cancel`` once the session reaches a final state, ``moved`` once it leaves
    ``attempt`` (if given)."""
    async for session in watch(link, name, 86400.0):
        if attempt is not None and session.attempt != attempt:
            moved.set()
        if session.state in FINAL:
            cancel.set()
            return


def ended(session: broker_pb2.Session) -> str:
    """How a session ended, for a message: its state and its failure reason, which the other
    peer (or the broker) wrote, escaped and cut (`ferry.files.shown`)."""
    state = broker_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower()
    reason = session.failure_reason
    return f"{state}: {shown(reason)}" if reason else state
