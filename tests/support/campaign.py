"""A kill -9 campaign: does every kill still end in a verified, confirmed file?

One trial (``run_trial``) starts a real broker, a real `ferry send --json` and a real
`ferry receive --json`, each client with its own XDG_STATE_HOME, then at a chosen moment
SIGKILLs a chosen set of victims among {sender, receiver, broker}, reruns exactly what was
killed (same arguments, same state folders; a killed broker comes back on the same port and
data folder) and waits, bounded, for both sides to report completion. Scenarios:

- ``plain``: any non-empty set of victims, rerun as above.
- ``broker-moved``: the broker and every running client are killed; the broker comes back
  with the same data folder on a NEW port and the clients are rerun against the new
  address (they must find their saved sessions by the broker's identity, not its address).
- ``lost-state``: the broker and every running client are killed and the broker's data
  folder is deleted; it comes back on the same port. The sender's rerun must then offer
  anew (a new code, not "resumed"), and the receiver is run with the new code.

Moments (when the kill lands), measured from the receiver's start:

- ``delay``: a random delay within the expected transfer time;
- ``offer``: the receiver printed the offer (claimed, consent given);
- ``part-bytes``: the receiver journalled its first verified chunk;
- ``part-half``: the receiver journalled half of the chunks;
- ``final-name``: the completion window: the final file name appeared in DEST (the
  receiver links the verified file into place, then reports completion to the broker);
- ``receiver-completed``: the receiver printed its completion line (the sender's and the
  broker's completion window).

Outcomes: ``ok`` (both exit 0 with a final completed line, the file's sha256 is the
source's, DEST holds exactly the file), ``corrupt`` (a file under its real name whose bytes
differ), ``lost`` (not completed within the bound even after the reruns), ``extra-rerun``
(a process that was not killed, or a rerun, exited non-zero on its own, and completed after
one more rerun), ``dirty`` (completed and verified, but DEST also holds other files, e.g. a
stale .ferry-part or journal).

A CLI process that had printed its completion line before the kill counts as completed (it
was only tidying up). Only 127.0.0.1 is used. Every wait is bounded by the trial's bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.files import random_file, sha256
from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess

__all__ = [
    "MOMENTS",
    "OUTCOMES",
    "ROLES",
    "SCENARIOS",
    "Plan",
    "TrialResult",
    "choose_plan",
    "required_plans",
    "run_trial",
    "summarize",
]

SCENARIOS = ("plain", "broker-moved", "lost-state")
MOMENTS = ("delay", "offer", "part-bytes", "part-half", "final-name", "receiver-completed")
# Moments that come before the receiver can have finished: the ones that make sense for a
# lost broker state (a sender cannot re-offer what a receiver already holds).
EARLY_MOMENTS = ("delay", "offer", "part-bytes", "part-half")
ROLES = ("sender", "receiver", "broker")
OUTCOMES = ("ok", "corrupt", "lost", "extra-rerun", "dirty")

CHUNK = "256K"
FILE_NAME = "source.bin"
# ferry.protocol.journal.RECORD_SIZE: a journal is a header, a SYNCED record, then one
# record per verified chunk (and a SYNCED one now and then). Kept here as a number so that
# a change of the format only skews the part-* moments instead of breaking the import.
JOURNAL_RECORD = 49
POLL_S = 0.001  # how often the event-triggered moments look at DEST
LINE_S = 30.0  # the longest wait for a process's first line

BrokerStarter = Callable[[Path], BrokerProcess]


@dataclass(frozen=True)
class Plan:
    """What a trial does: the scenario, whom it kills and when."""

    scenario: str
    victims: tuple[str, ...]
    moment: str
    delay: float = 0.0  # seconds after the receiver's start, for moment "delay"


@dataclass
class RunRecord:
    """One run of `ferry send` or `ferry receive` within a trial."""

    role: str
    attempt: int
    why: str  # "first", "after-kill", "extra" (it had failed on its own) or "new-code"
    broker: str
    code: str
    started_at: float  # seconds since the trial began
    rc: int | None = None
    first_event: str | None = None
    last_event: str | None = None
    killed: bool = False  # a victim of the trial's kill
    completed_before_kill: bool = False
    stopped: bool = False  # still running when the trial ended: SIGKILLed by the harness
    seconds: float = 0.0
    stderr_tail: list[str] = field(default_factory=list)


@dataclass
class TrialResult:
    """What happened in one trial, JSON-serializable via ``record()``."""

    index: int
    seed: str
    scenario: str
    victims: list[str]  # as planned
    moment: str
    size: int
    delay: float = 0.0
    killed: list[str] = field(default_factory=list)  # the victims that were still running
    moment_reached: bool = False
    kill_at: float | None = None  # seconds after the receiver's start
    dest_at_kill: list[str] = field(default_factory=list)  # DEST just after the kill
    receiver_done_before_kill: bool = False
    sender_done_before_kill: bool = False
    # Completion moments only: the session's state per `ferry status --json` (the
    # receiver's state folder) once the broker is up again, before any rerun; "completed"
    # means the kill came after the broker had recorded the completion.
    broker_view: list[str] = field(default_factory=list)
    reoffered: bool = False  # lost-state: a sender rerun offered anew (as it should)
    outcome: str = "lost"
    reason: str = ""
    failed: str = ""  # which process failed (role and attempt), if one did
    runs: list[RunRecord] = field(default_factory=list)
    brokers: list[dict[str, Any]] = field(default_factory=list)
    dest_listing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def victim_set(self) -> str:
        """The planned victims as one label, e.g. "broker+sender"."""
        return "+".join(sorted(self.victims))

    def record(self) -> dict[str, Any]:
        """Everything, as plain JSON values."""
        return asdict(self)

    def line(self) -> str:
        """A one-line summary."""
        at = f"{self.kill_at:.3f}s" if self.kill_at is not None else "-"
        reached = "" if self.moment_reached else " (moment not reached)"
        if sorted(self.killed) != sorted(self.victims):
            reached += f" (killed: {'+'.join(sorted(self.killed)) or 'none'})"
        why = f": {self.reason}" if self.reason else ""
        return (
            f"#{self.index} {self.size >> 20}M [{self.scenario}] kill {self.victim_set} "
            f"at {self.moment} {at}{reached} -> {self.outcome}{why} ({self.seconds:.1f} s)"
        )

    def explain(self) -> str:
        """The summary and the full record, for an assertion message."""
        return f"{self.line()}\n{json.dumps(self.record(), indent=1)}"


# -- planning -------------------------------------------------------------------------


def expected_seconds(size: int) -> float:
    """A rough receive time on a shared 2-core machine: start-up, claim, then the bytes."""
    return 0.45 + size / (48 << 20)


def choose_plan(
    rng: random.Random,
    size: int,
    *,
    scenario: str | None = None,
    moment: str | None = None,
    victims: tuple[str, ...] | None = None,
) -> Plan:
    """A random plan; ``scenario``, ``moment`` and ``victims`` pin those parts.

    ``victims`` are any non-empty subset in scenario ``plain``; the other scenarios always
    kill the broker and every running client.
    """
    if scenario is None:
        scenario = rng.choices(SCENARIOS, weights=(70, 15, 15))[0]
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}")
    if moment is None:
        moment = rng.choice(MOMENTS if scenario != "lost-state" else EARLY_MOMENTS)
    if moment not in MOMENTS:
        raise ValueError(f"unknown moment {moment!r}")
    if scenario != "plain":
        victims = ROLES
    elif victims is None:
        mask = rng.randrange(1, 1 << len(ROLES))
        victims = tuple(r for i, r in enumerate(ROLES) if mask >> i & 1)
    if not victims or not set(victims) <= set(ROLES):
        raise ValueError(f"victims must be a non-empty subset of {ROLES}")
    span = expected_seconds(size) * (0.5 if scenario == "lost-state" else 1.0)
    delay = round(rng.uniform(0.0, span), 3) if moment == "delay" else 0.0
    return Plan(scenario, tuple(sorted(victims)), moment, delay)


def required_plans() -> list[dict[str, Any]]:
    """Constraints for the trials every campaign must contain, in order."""
    return [
        {"scenario": "plain", "moment": "final-name", "victims": ("receiver",)},
        {"scenario": "broker-moved"},
        {"scenario": "lost-state"},
    ]


# -- the processes of a trial ----------------------------------------------------------


class _Run:
    """One CLI run: its process, the JSON lines seen so far, and its record."""

    def __init__(self, proc: FerryProcess, record: RunRecord, t0: float) -> None:
        self.proc = proc
        self.record = record
        self.lines: list[dict[str, Any]] = []
        self.t0 = t0
        self.started = time.monotonic()
        self.collected = False

    def running(self) -> bool:
        assert self.proc.proc is not None
        return self.proc.proc.poll() is None

    def next_line(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON line, or None if there is none within ``timeout`` (or it exited)."""
        try:
            line = self.proc.line(max(timeout, 0.0))
        except (TimeoutError, RuntimeError, ValueError):
            return None
        self.lines.append(line)
        if self.record.first_event is None:
            self.record.first_event = str(line.get("event"))
        return line

    def kill(self) -> bool:
        """SIGKILL it if it runs; whether it did. Its output is collected either way."""
        assert self.proc.proc is not None
        was_running = self.proc.proc.poll() is None
        if was_running:
            self.proc.proc.send_signal(signal.SIGKILL)
            self.record.killed = True
        self.collect()
        if was_running and self.completed():
            self.record.completed_before_kill = True
        return was_running

    def stop(self) -> None:
        """End it, whatever its state (the harness's own clean-up, not a victim's kill)."""
        assert self.proc.proc is not None
        if self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGKILL)
            self.record.stopped = True
        self.collect()
        self.proc.kill()  # closes its pipes

    def collect(self) -> None:
        """Wait for the exit (bounded) and take the rest of its output."""
        if self.collected:
            return
        self.collected = True
        assert self.proc.proc is not None
        try:
            self.proc.proc.wait(timeout=10)
            rc, rest, err = self.proc.finish(10)
            self.lines += rest
        except ValueError:  # a line cut short by the kill
            rc = self.proc.proc.returncode
            err = self.proc.stderr_path.read_text() if self.proc.stderr_path else ""
        except Exception as exc:  # it would not die: record, never hang
            self.proc.kill()
            rc = self.proc.proc.returncode
            err = f"collecting its output failed: {exc!r}"
        self.record.rc = rc
        self.record.seconds = round(time.monotonic() - self.started, 3)
        if self.lines:
            if self.record.first_event is None:
                self.record.first_event = str(self.lines[0].get("event"))
            self.record.last_event = str(self.lines[-1].get("event"))
        self.record.stderr_tail = _tail(err)

    def completed(self) -> bool:
        """It printed a completion line last (rc aside: a kill after it still counts)."""
        return bool(self.lines) and self.lines[-1].get("event") == "completed"

    def succeeded(self) -> bool:
        return self.record.completed_before_kill or (self.record.rc == 0 and self.completed())


def _tail(text: str, n: int = 3) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


def _start_broker(data_dir: Path) -> BrokerProcess:
    broker = BrokerProcess(data_dir=data_dir, args=list(FAST_BROKER))
    broker.start()
    return broker


class _Trial:
    """The state of one trial while it runs."""

    def __init__(
        self,
        root: Path,
        rng: random.Random,
        plan: Plan,
        result: TrialResult,
        source: Path,
        start_broker: BrokerStarter,
        bound_s: float,
    ) -> None:
        self.root = root
        self.rng = rng
        self.plan = plan
        self.result = result
        self.source = source
        self.dest = root / "dest"
        self.start_broker = start_broker
        self.t0 = time.monotonic()
        self.deadline = self.t0 + bound_s
        self.broker: BrokerProcess | None = None
        self.code = ""
        self.runs: dict[str, _Run] = {}
        self.all_runs: list[_Run] = []
        self.extra_used: set[str] = set()
        self.reoffered = False

    # processes

    def _env(self, role: str) -> dict[str, str]:
        assert self.broker is not None
        return {
            **os.environ,
            "FERRY_BROKER": self.broker.address,
            "FERRY_ADDRESSES": "127.0.0.1",
            "XDG_STATE_HOME": str(self.root / f"state-{role}"),
            "PYTHONUNBUFFERED": "1",
        }

    def _args(self, role: str) -> list[str]:
        if role == "sender":
            return ["send", str(self.source), "--json", "--chunk-size", CHUNK]
        return ["receive", self.code, "--dest", str(self.dest), "--yes", "--json"]

    def start(self, role: str, why: str) -> _Run:
        assert self.broker is not None
        attempt = sum(1 for r in self.all_runs if r.record.role == role) + 1
        record = RunRecord(
            role=role,
            attempt=attempt,
            why=why,
            broker=self.broker.address,
            code=self.code if role == "receiver" else "",
            started_at=round(time.monotonic() - self.t0, 3),
        )
        proc = FerryProcess(self._args(role), self._env(role), self.root).start()
        run = _Run(proc, record, self.t0)
        self.runs[role] = run
        self.all_runs.append(run)
        self.result.runs.append(record)
        return run

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start_sender(self, why: str) -> str | None:
        """(Re)run the sender and read its first line; None if fine, else why it is lost."""
        run = self.start("sender", why)
        first = run.next_line(min(LINE_S, self.left()))
        if first is None:
            if run.running():
                run.stop()
                return f"sender ({why}) printed no first line within {LINE_S:g} s"
            if why == "first":
                return "sender exited before its first line"
            return None  # it exited: the wait loop judges it
        event = first.get("event")
        if why == "first":
            if event != "offered":
                return f"sender's first line is {first!r}, not offered"
            self.code = str(first["code"])
            run.record.code = self.code
            return None
        if event == "resumed":
            if self.plan.scenario == "lost-state" and not self.reoffered:
                return f"sender rerun ({why}) resumed on a broker that lost its state"
            if first.get("code") != self.code:
                self.result.notes.append(f"resumed with code {first.get('code')} != {self.code}")
            return None
        if event == "offered":
            run.record.code = str(first.get("code"))
            if self.plan.scenario == "lost-state" and not self.reoffered:
                self.reoffered = self.result.reoffered = True
                if first.get("code") == self.code:
                    self.result.notes.append("the new offer has the old code")
                self.code = str(first["code"])
                return None
            return f"sender rerun ({why}) printed offered (a new code) instead of resumed"
        return None  # "failed" and the like: the wait loop judges the exit

    # the moment

    def _journal_chunks(self) -> int:
        best = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dest):
                if entry.name.endswith(".journal"):
                    with contextlib.suppress(OSError):
                        best = max(best, entry.stat().st_size // JOURNAL_RECORD - 2)
        return best

    def wait_for_moment(self) -> bool:
        """Block until the plan's moment (bounded); whether it was reached."""
        receiver = self.runs["receiver"]
        moment = self.plan.moment
        if moment == "delay":
            time.sleep(max(min(self.plan.delay, self.left()), 0.0))
            return True
        give_up = min(self.deadline, time.monotonic() + 60.0)
        if moment in ("offer", "receiver-completed"):
            want = "offer" if moment == "offer" else "completed"
            while time.monotonic() < give_up:
                line = receiver.next_line(give_up - time.monotonic())
                if line is None:
                    return False
                if line.get("event") == want:
                    return True
            return False
        chunks = -(-self.result.size // (256 << 10))
        final = self.dest / FILE_NAME
        while time.monotonic() < give_up:
            if moment == "final-name":
                if os.path.lexists(final):
                    return True
            else:
                need = 1 if moment == "part-bytes" else chunks // 2
                if self._journal_chunks() >= need:
                    return True
                if os.path.lexists(final):
                    return False  # done already: the moment has passed
            if not receiver.running():
                return False
            time.sleep(POLL_S)
        return False

    # killing and restarting

    def kill(self) -> None:
        """SIGKILL the victims (in a random order, back to back) and note who died."""
        plan = self.plan
        victims = set(plan.victims)
        order = [r for r in ROLES if r in victims]
        self.rng.shuffle(order)
        killed: list[str] = []
        for role in order:
            if role == "broker":
                assert self.broker is not None
                assert self.broker.proc is not None
                if self.broker.proc.poll() is None:
                    killed.append(role)
                self.broker.kill()
            elif self.runs[role].kill():
                killed.append(role)
        self.result.killed = killed
        self.result.dest_at_kill = _listing(self.dest)
        self.result.receiver_done_before_kill = self.runs["receiver"].completed()
        self.result.sender_done_before_kill = self.runs["sender"].completed()

    def restart_broker(self) -> None:
        broker = self.broker
        assert broker is not None
        old = broker.address
        if self.plan.scenario == "lost-state":
            shutil.rmtree(broker.data_dir, ignore_errors=True)
        if self.plan.scenario == "broker-moved":
            for _ in range(3):  # port 0 might hand out the old port again
                broker.listen = "127.0.0.1:0"
                broker.start()
                if broker.address != old:
                    break
                broker.kill()
            else:
                raise RuntimeError(f"the broker came back on {old} three times")
        else:
            broker.start()  # the same port

    def look_at_broker(self) -> None:
        """Record the broker's view of the session (a diagnostic; bounded)."""
        assert self.broker is not None
        args = ["status", "--json", "--broker", self.broker.address]
        proc = FerryProcess(args, self._env("receiver"), self.root).start()
        try:
            rc, lines, err = proc.finish(min(10.0, max(self.left(), 1.0)))
        except Exception as exc:
            self.result.broker_view = [f"status failed: {exc!r}"]
            return
        finally:
            proc.kill()
        view = [
            str(line.get("state")) + (f" ({line['error']})" if line.get("error") else "")
            for line in lines
            if "state" in line
        ]
        self.result.broker_view = view or [f"status rc {rc}: {' | '.join(_tail(err, 1))}"]

    def needs_rerun(self, role: str) -> bool:
        run = self.runs[role]
        return run.record.killed and not run.record.completed_before_kill


def _broker_logs(broker: BrokerProcess | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if broker is None:
        return out
    for path in broker.log:
        text = ""
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
        out.append({"log": path.name, "tail": _tail(text)})
    return out


def _listing(dest: Path) -> list[str]:
    try:
        return sorted(p.name for p in dest.iterdir())
    except OSError:
        return []


# -- a trial ----------------------------------------------------------------------------


def run_trial(
    root: Path,
    rng: random.Random,
    size: int,
    *,
    index: int = 0,
    seed: str = "",
    scenario: str | None = None,
    moment: str | None = None,
    victims: tuple[str, ...] | None = None,
    source: Path | None = None,
    start_broker: BrokerStarter | None = None,
    bound_s: float = 90.0,
) -> TrialResult:
    """Run one trial in the new folder ``root`` and return what happened.

    ``source`` is a file named ``source.bin`` of ``size`` bytes (made in ``root`` if not
    given). ``start_broker(data_dir)`` returns a started broker (default: a BrokerProcess
    with FAST_BROKER flags); it is killed at the end either way. ``bound_s`` bounds the
    whole trial: what has not completed by then is "lost".
    """
    root.mkdir(parents=True)
    plan = choose_plan(rng, size, scenario=scenario, moment=moment, victims=victims)
    result = TrialResult(
        index=index,
        seed=seed,
        scenario=plan.scenario,
        victims=list(plan.victims),
        moment=plan.moment,
        size=size,
        delay=plan.delay,
    )
    if source is None:
        source = random_file(root / "src" / FILE_NAME, size)
    if source.name != FILE_NAME or source.stat().st_size != size:
        raise ValueError(f"source must be a {size}-byte file named {FILE_NAME}")
    want = sha256(source)
    trial = _Trial(root, rng, plan, result, source, start_broker or _start_broker, bound_s)
    try:
        _play(trial)
    except Exception as exc:  # a harness or set-up failure still yields a record
        result.outcome, result.reason = "lost", f"harness: {exc!r}"
    finally:
        for run in trial.all_runs:
            run.stop()
        if trial.broker is not None:
            trial.broker.kill()
    result.brokers = _broker_logs(trial.broker)
    _judge(trial, want)
    result.seconds = round(time.monotonic() - trial.t0, 3)
    return result


def _fail(trial: _Trial, run: _Run | None, reason: str) -> None:
    trial.result.outcome = "lost"
    trial.result.reason = reason
    if run is not None:
        trial.result.failed = f"{run.record.role}#{run.record.attempt}"


def _play(trial: _Trial) -> None:
    """Set up, kill at the moment, rerun, and wait: sets outcome "lost" or leaves it ""."""
    result = trial.result
    trial.broker = trial.start_broker(trial.root / "broker")
    lost = trial.start_sender("first")
    if lost is not None:
        return _fail(trial, trial.runs["sender"], f"set-up: {lost}")
    receiver_start = time.monotonic()
    trial.start("receiver", "first")
    result.moment_reached = trial.wait_for_moment()
    result.kill_at = round(time.monotonic() - receiver_start, 4)
    trial.kill()  # in the broker-moved and lost-state scenarios: all three
    if "broker" in result.killed or trial.plan.scenario != "plain":
        trial.restart_broker()
    if trial.plan.moment in ("final-name", "receiver-completed"):
        trial.look_at_broker()
    if trial.needs_rerun("sender"):
        lost = trial.start_sender("after-kill")
        if lost is not None:
            return _fail(trial, trial.runs["sender"], lost)
    if trial.reoffered:
        if not trial.needs_rerun("receiver"):
            result.notes.append("the receiver had completed before the broker lost its state")
        trial.start("receiver", "new-code")
    elif trial.needs_rerun("receiver"):
        trial.start("receiver", "after-kill")
    return _wait(trial)


def _wait(trial: _Trial) -> None:
    """Until both sides succeed: one extra rerun each for a failure on its own."""
    done: set[str] = set()
    while len(done) < 2:
        if trial.left() <= 0:
            running = [r for r in ("sender", "receiver") if r not in done]
            return _fail(
                trial, trial.runs[running[0]], f"not completed within the bound: {running}"
            )
        for role in ("sender", "receiver"):
            run = trial.runs[role]
            if role in done or run.running():
                continue
            run.collect()
            if run.succeeded():
                done.add(role)
                continue
            last = run.record.stderr_tail[-1] if run.record.stderr_tail else ""
            if role in trial.extra_used:
                return _fail(
                    trial, run, f"{role} failed again (rc {run.record.rc}) after a rerun: {last}"
                )
            trial.extra_used.add(role)
            trial.result.notes.append(f"{role}#{run.record.attempt} failed on its own: {last}")
            if role == "sender":
                reoffered = trial.reoffered
                lost = trial.start_sender("extra")
                if lost is not None:
                    return _fail(trial, trial.runs["sender"], lost)
                if trial.reoffered and not reoffered:  # lost-state: the receiver needs it
                    trial.runs["receiver"].stop()
                    done.discard("receiver")
                    trial.start("receiver", "new-code")
            else:
                trial.start("receiver", "extra")
        time.sleep(0.02)
    return None


def _judge(trial: _Trial, want: str) -> None:
    """Set the outcome from the processes' ends and DEST."""
    result = trial.result
    final = trial.dest / FILE_NAME
    result.dest_listing = _listing(trial.dest)
    try:
        got = sha256(final) if final.is_file() else None
    except OSError:
        got = None
    sender, receiver = trial.runs.get("sender"), trial.runs.get("receiver")
    if got is not None and got != want:
        result.outcome = "corrupt"
        result.reason = f"{FILE_NAME} in DEST has other bytes (sha256 {got[:16]}...)"
        return
    if result.reason:  # lost already, with its reason
        return
    if sender is None or receiver is None or not (sender.succeeded() and receiver.succeeded()):
        _fail(trial, None, "not both sides completed")
        return
    if got is None:
        result.outcome, result.reason = "lost", f"both completed, but no {FILE_NAME} in DEST"
        return
    done = receiver.lines[-1]
    if done.get("bytes") != result.size:
        result.notes.append(f"receiver's completion line says {done.get('bytes')} bytes")
    if sender.lines[-1].get("session") != done.get("session"):
        result.notes.append("sender and receiver completed different sessions")
    if result.dest_listing != [FILE_NAME]:
        result.outcome = "dirty"
        result.reason = f"DEST holds {result.dest_listing}"
        return
    result.outcome = "extra-rerun" if trial.extra_used else "ok"
    if trial.extra_used:
        result.reason = "; ".join(n for n in result.notes if "failed on its own" in n)


# -- a campaign's summary ----------------------------------------------------------------


def summarize(results: list[TrialResult]) -> str:
    """Outcome counts overall, by scenario, by victim set and by moment, as text."""

    def table(title: str, key: Callable[[TrialResult], str]) -> list[str]:
        groups: dict[str, dict[str, int]] = {}
        for r in results:
            counts = groups.setdefault(key(r), dict.fromkeys(OUTCOMES, 0))
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        width = max([len(title), *(len(k) for k in groups)])
        head = f"{title:<{width}}  " + "  ".join(f"{o:>11}" for o in OUTCOMES)
        rows = [
            f"{k:<{width}}  " + "  ".join(f"{c[o]:>11}" for o in OUTCOMES)
            for k, c in sorted(groups.items())
        ]
        return [head, *rows, ""]

    lines = table("all", lambda r: "all")
    lines += table("scenario", lambda r: r.scenario)
    lines += table("victims", lambda r: r.victim_set)
    lines += table("scenario / victims", lambda r: f"{r.scenario} / {r.victim_set}")
    lines += table("moment", lambda r: r.moment)
    return "\n".join(lines)
