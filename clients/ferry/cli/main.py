"""The `ferry` command: serve, send, receive, status, digest.

A thin layer over `ferry.client`: it parses arguments, asks for consent, draws progress
on a terminal (or prints one JSON object per line with --json) and turns every failure
into one line on stderr and a non-zero exit code. Exit codes: 0 verified and complete,
1 failed or declined, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ferry.broker.cli import add_arguments as add_broker_arguments
from ferry.cli import _state
from ferry.client import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PORTS,
    BrokerError,
    Client,
    Completed,
    Device,
    DeviceKeyChanged,
    Event,
    FerryError,
    GoneOffer,
    InboxOffer,
    InboxUpdate,
    Incoming,
    KnownDevices,
    NotEnrolled,
    OfferedFile,
    Outgoing,
    Paused,
    PeerDevice,
    Progress,
    SourceChangedError,
    TamperedError,
    TransferError,
    TransferOver,
    TransferResult,
    new_claim_exchange,
    remove_partial,
    store_refused,
)
from ferry.files import (
    DestinationExistsError,
    SourceStamp,
    UnsafePathError,
    escape_name,
    format_size,
    shown,
    terminal_line,
)
from ferry.protocol import FILE_DIGEST_ALGORITHM
from ferry.protocol.pake import Code, KeyExchange, PeerRole

__all__ = ["main"]

DEFAULT_BROKER = "127.0.0.1:50051"
DEFAULT_BROKER_WAIT = 300.0
_DEFAULT_PORTS = f"{DEFAULT_PORTS[0]}-{DEFAULT_PORTS[1]}"
#: How much of one file name the consent prompt shows (a path may be 4,096 bytes).
_NAME_CHARS = 1024
#: How much of a session's failure reason `ferry status --json` passes on (the broker's own
#: limit; a broker that sends more is cut).
_REASON_CHARS = 1024
#: Broker refusals that say, whatever the wording, "this broker does not know that session".
_UNKNOWN_SESSION = frozenset({"TOKEN_INVALID", "SESSION_NOT_FOUND", "WRONG_SESSION"})
#: How much of a user's or device's name a line shows.
_PERSON_CHARS = 64
#: An offer's id as `ferry inbox` shows it (or a prefix of 6 or more of its characters).
_OFFER_ID = re.compile(r"(sessions/)?[0-9a-f]{6,32}")


class CliError(FerryError):
    """A failure to report as one line and exit 1."""


def _emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout. ASCII only (json escapes every control and non-ASCII
    character), so no string in it can act on a terminal; what a peer or the broker wrote
    is bounded where it enters (`ferry.files.shown`)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    """One line on stderr, through the terminal guard: whatever a message holds (a peer's
    reason, a broker's error), no escape sequence and no endless line reaches the terminal."""
    sys.stderr.write(terminal_line(text) + "\n")
    sys.stderr.flush()


def _ports(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition("-")
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r} (e.g. 47100-47999)") from None
    if not 1 <= lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r} (e.g. 47100-47999)")
    return lo, hi


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1M)") from None


def _completed_line(result: TransferResult) -> dict[str, Any]:
    line: dict[str, Any] = {
        "event": "completed",
        "session": result.session,
        "bytes": result.bytes,
        "bytes_transferred": result.bytes_transferred,
        "bytes_resumed": result.bytes_resumed,
        "chunks_retried": result.chunks_retried,
        "seconds": round(result.seconds, 6),
        "path": result.path,
        "files": [
            {"path": f.path, "size": f.size, "digests": {f.algorithm: f.digest}}
            for f in result.files
        ],
    }
    if result.connection is not None:
        # "host", "punched" or "store" (then "connection" says why no pair worked).
        line["route"] = result.connection.route
        line["connection"] = result.connection.to_json()
    if result.first_chunk_seconds is not None:
        line["first_chunk_seconds"] = round(result.first_chunk_seconds, 6)
    return line


class _Events:
    """Turns library events into a progress bar (terminal) or nothing (JSON mode)."""

    def __init__(self, as_json: bool, label: str) -> None:
        self.bar = None
        self.as_json = as_json
        if not as_json and sys.stderr.isatty():
            from ferry.cli import _progress  # rich costs ~25 ms to import: only for a terminal

            self.bar = _progress.open_bar(label)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Paused):
            if self.as_json:
                _emit({"event": "paused", "reason": event.reason})
            else:
                # The library escaped and cut the receiver's words (`shown`) already.
                _say(f"ferry: the receiver paused ({event.reason}); waiting for it")
            return
        if self.bar is None:
            return
        if isinstance(event, Progress):
            self.bar.update(event.bytes_done, event.total)
        elif isinstance(event, Completed):
            total = event.result.bytes
            self.bar.update(total, total)  # the last poll may predate the last chunk
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- send -----------------------------------------------------------------------------


def _client(ns: argparse.Namespace, **options: Any) -> Client:
    """A Client for this command, which says on stderr when it waits for the broker."""
    said = [0.0]

    def waiting(exc: BrokerError) -> None:
        now = time.monotonic()
        if now - said[0] >= 30:
            said[0] = now
            if exc.reason == "RATE_LIMITED":
                _say(
                    "ferry: the broker is limiting calls from this address (someone here may"
                    " be guessing codes, or flooding it); trying again for up to a minute"
                )
                return
            _say(
                f"ferry: waiting for the broker at {escape_name(ns.broker)} ({exc}); "
                f"up to {ns.broker_wait:g} s (--broker-wait)"
            )

    return Client(
        ns.broker,
        ports=ns.ports,
        broker_wait=ns.broker_wait,
        on_broker_wait=waiting,
        broker_ca=ns.broker_ca,
        broker_cert=ns.broker_cert,
        broker_key=ns.broker_key,
        insecure_plaintext=ns.insecure_plaintext,
        **options,
    )


async def _offer_or_resume(
    ns: argparse.Namespace, client: Client, broker_id: str
) -> tuple[Outgoing, bool]:
    """Resume this machine's unfinished offer of the very same paths, else offer anew.

    A saved offer is one of this broker's (by id, wherever it listens now). It is given up,
    and the files offered anew, when the broker says it does not know it (by the reason of
    its refusal, never its wording) or that it is over; a changed file fails instead.
    """
    sources = [str(p.absolute()) for p in ns.paths]
    found = _state.find("sender", broker_id, sources=sources, done=None)
    if found is not None:
        name, entry = found
        try:
            stamps = [SourceStamp.from_text(t) for t in entry.get("stamps") or []] or None
        except ValueError:
            stamps = None
        try:
            outgoing = await client.resume_offer(
                name,
                entry["token"],
                ns.paths,
                entry["code"],
                via=ns.via,
                stamps=stamps,
                pake_state=bytes.fromhex(entry.get("pake_state", "")),
                verify=_verifier(ns),
            )
        except SourceChangedError:
            _state.forget(name)
            raise
        except TransferOver:
            _state.forget(name)
        except BrokerError as exc:
            if exc.reason not in _UNKNOWN_SESSION:
                raise
            _state.forget(name)
        else:
            _state.update(name, broker=ns.broker)
            return outgoing, True
    outgoing = await client.offer(
        ns.paths, chunk_size=ns.chunk_size, ttl=_ttl(ns, CODE_TTL), via=ns.via, verify=_verifier(ns)
    )
    _remember_sent(
        ns,
        outgoing,
        broker_id,
        sources,
        code=outgoing.code,
        pake_state=outgoing.pake_state.hex(),  # secret, like the code: the file is 0600
    )
    return outgoing, False


def _remember_received(
    ns: argparse.Namespace, incoming: Incoming, broker_id: str, **found_by: str
) -> None:
    """Keep what a rerun of this `ferry receive` needs to resume (``found_by``: the code,
    or the offer's name), the session's key among it: a secret, the file is 0600."""
    _state.remember(
        incoming.name,
        incoming.token,
        "receiver",
        ns.broker,
        broker_id,
        **found_by,
        key=incoming.key.secret.hex(),
        dest=str(ns.dest),
    )


def _remember_sent(
    ns: argparse.Namespace, outgoing: Outgoing, broker_id: str, sources: Any, **secrets: Any
) -> None:
    """Keep what a rerun of this `ferry send` needs to resume the offer (the file is 0600:
    ``secrets`` hold its code and PAKE state, or a person offer's key)."""
    _state.remember(
        outgoing.name,
        outgoing.token,
        "sender",
        ns.broker,
        broker_id,
        sources=sources,
        stamps=[stamp.to_text() for stamp in outgoing.stamps],
        **secrets,
    )


def _verifier(ns: argparse.Namespace) -> Any:
    """With --verify: show the words derived from the key and ask whether the receiver's
    side shows the same ones (the sender goes on only if so)."""
    if not ns.verify:
        return None

    async def verify(words: str) -> bool:
        if ns.json:
            _emit({"event": "verify", "words": words})
        else:
            _say(f"Verification words: {words}")
            sys.stderr.write("Does the receiver see the same words? [y/N] ")
            sys.stderr.flush()
        answer = await asyncio.to_thread(sys.stdin.readline)
        return answer.strip().lower() in ("y", "yes")

    return verify


async def _send(ns: argparse.Namespace) -> int:
    if ns.to:
        return await _send_to(ns)
    client = _client(ns)
    broker_id = await client.broker_id()
    client.device = _device_or_none(broker_id)  # signs a code in where the broker wants it
    outgoing, resumed = await _offer_or_resume(ns, client, broker_id)
    try:
        if ns.json:
            _emit(
                {
                    "event": "resumed" if resumed else "offered",
                    "code": outgoing.code,
                    "session": outgoing.name,
                    "files": len(outgoing.files),
                    "bytes": outgoing.total_size,
                }
            )
        else:
            what = (
                f"{len(outgoing.files)} files"
                if len(outgoing.files) != 1
                else escape_name(outgoing.files[0].path)
            )
            verb = "Resuming" if resumed else "Sending"
            _say(f"{verb} {what} ({format_size(outgoing.total_size)}).")
            _say(f"Code: {outgoing.code}")
            _say(f"On the other machine run:  ferry receive {outgoing.code}")
        return await _transfer(ns, outgoing)
    finally:
        await outgoing.close()


async def _cancel_quietly(cancel: Any) -> None:
    with contextlib.suppress(BrokerError, TimeoutError):
        await asyncio.wait_for(cancel(), 3)


#: How long an offer waits by default: a code is read out to someone there now; a person
#: may be away for the day (the broker clamps either to its --offer-ttl-max).
CODE_TTL = 600.0
PERSON_TTL = 24 * 3600.0


def _ttl(ns: argparse.Namespace, default: float) -> float:
    return float(ns.ttl) if ns.ttl is not None else default


def _stored(ns: argparse.Namespace, outgoing: Outgoing, result: TransferResult) -> None:
    """Store-and-forward: the files are in the object store; this sender may go."""
    expires = outgoing.session.expire_time.ToDatetime().replace(microsecond=0)
    if ns.json:
        _emit(
            {
                "event": "stored",
                "session": result.session,
                "code": outgoing.code,
                "bytes": result.bytes,
                "bytes_uploaded": result.bytes_transferred,
                "bytes_resumed": result.bytes_resumed,
                "seconds": round(result.seconds, 6),
                "expire_time": expires.isoformat() + "Z",
                "path": result.path,
                "files": [
                    {"path": f.path, "size": f.size, "digests": {f.algorithm: f.digest}}
                    for f in result.files
                ],
            }
        )
        return
    who = "the receiver can fetch them with the code"
    if outgoing.session.HasField("person"):
        person = outgoing.session.person
        recipient = shown(person.recipient_user, _PERSON_CHARS)
        who = (
            f"sealed to {recipient}'s {len(person.key_envelopes)} device(s), which can take"
            " them when they next sign in,"
        )
    _say(
        f"Stored {len(result.files)} file(s), {format_size(result.bytes)} in the object store; "
        f"{who} until {expires} UTC."
    )


def _finish(ns: argparse.Namespace, result: TransferResult, verb: str) -> None:
    if ns.json:
        _emit(_completed_line(result))
        return
    rate = result.bytes_transferred / result.seconds / 1e6 if result.seconds > 0 else 0.0
    _say(
        f"{verb} {len(result.files)} file(s), {format_size(result.bytes)} in "
        f"{result.seconds:.2f} s ({rate:.0f} MB/s), verified ({FILE_DIGEST_ALGORITHM})."
    )


# -- receive --------------------------------------------------------------------------


def _offered_file(f: OfferedFile) -> dict[str, Any]:
    line: dict[str, Any] = {"path": f.path, "size": f.size}
    if f.renamed:
        line["local_path"] = f.local_path  # where it is written (a safe form of "path")
    return line


def _show_offer(ns: argparse.Namespace, incoming: Incoming, dest: Path) -> None:
    """The offer, before consent: each file's name as offered and, for a name that is not
    safe here, the name it is saved under (``aux.c -> aux_.c``)."""
    ok, free = incoming.free_space(dest)
    if ns.json:
        _emit(
            {
                "event": "offer",
                "session": incoming.name,
                "files": [_offered_file(f) for f in incoming.files],
                "bytes": incoming.total_size,
                "free_bytes": free,
            }
        )
    else:
        _say(
            f"Offered: {len(incoming.files)} file(s), {format_size(incoming.total_size)} "
            f"(free in {escape_name(str(dest))}: {format_size(free)})"
        )
        for f in incoming.files:
            shown_as = shown(f.path, _NAME_CHARS)
            if f.renamed:
                shown_as += f"  ->  {shown(f.local_path, _NAME_CHARS)}"
            _say(f"  {shown_as}  {format_size(f.size)}")
        renamed = sum(f.renamed for f in incoming.files)
        if renamed:
            _say(
                f"{renamed} name(s) cannot be written here as they are: saved under the "
                "name after the arrow"
            )
    if not ok:
        raise CliError(
            f"not enough free space: {format_size(incoming.total_size)} offered, "
            f"{format_size(free)} free in {escape_name(str(dest))}"
        )


def _consent(ns: argparse.Namespace) -> bool:
    if ns.yes:
        return True
    if not ns.json:
        sys.stderr.write("Accept? [y/N] ")
        sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def _claim_or_resume(ns: argparse.Namespace, client: Client, broker_id: str) -> Incoming:
    """Resume this machine's unfinished transfer of the same code, else claim the code.

    The claim's request id is saved before the claim, so a receiver killed mid-claim can
    repeat it: the code itself is used up by then.
    """
    key = _state.code_key(ns.code)
    found = _state.find("receiver", broker_id, code=key)
    request_id = uuid.uuid4().hex
    exchange = new_claim_exchange(ns.code)
    if found is not None:
        name, entry = found
        if entry.get("token") and entry.get("key"):
            try:
                incoming = await client.resume_claim(
                    name, entry["token"], bytes.fromhex(entry["key"])
                )
            except BrokerError as exc:
                if exc.reason not in _UNKNOWN_SESSION:
                    raise
                _state.forget(name)
            else:
                _state.update(name, broker=ns.broker)
                return incoming
        elif not entry.get("token"):
            request_id = entry.get("claim_request") or request_id
            with contextlib.suppress(ValueError):  # none saved, or not one of ours: a new one
                exchange = KeyExchange.restore(
                    PeerRole.RECEIVER, bytes.fromhex(entry.get("pake_state", ""))
                )
    pending = f"pending/{key}"
    _state.remember(
        pending,
        "",
        "receiver",
        ns.broker,
        broker_id,
        code=key,
        claim_request=request_id,
        pake_state=exchange.state().hex() if exchange else "",  # secret: the file is 0600
        dest=str(ns.dest),
    )
    try:
        incoming = await client.claim(ns.code, request_id, exchange, on_words=_words_shower(ns))
    except BrokerError as exc:
        if not exc.unreachable:
            _state.forget(pending)  # a wrong or used-up code: nothing to repeat
        raise
    _remember_received(ns, incoming, broker_id, code=key)
    _state.forget(pending)  # only now: a kill in between leaves one of the two
    return incoming


def _words_shower(ns: argparse.Namespace) -> Any:
    """With --verify: show the receiver's verification words as soon as they are known."""
    if not ns.verify:
        return None

    def show(words: str) -> None:
        if ns.json:
            _emit({"event": "verify", "words": words})
        else:
            _say(f"Verification words: {words} (accept only if the sender sees the same)")

    return show


def _read_code(ns: argparse.Namespace) -> str:
    """The code: the argument, else FERRY_CODE, else asked for (without echo on a
    terminal; one line of stdin otherwise). Not on argv is better: other local users can
    read a process's arguments."""
    code = ns.code or os.environ.get("FERRY_CODE", "")
    if not code:
        if sys.stdin.isatty():
            import getpass

            code = getpass.getpass("Code: ")
        else:
            code = sys.stdin.readline()
    code = code.strip()
    if not code:
        raise CliError("no code given (argument, FERRY_CODE, or typed when asked)")
    Code.parse(code)  # a typo is told here, before anything goes to the broker
    return code


async def _receive(ns: argparse.Namespace) -> int:
    if ns.watch or ns.from_user or _OFFER_ID.fullmatch(ns.code or ""):
        return await _receive_person(ns)
    ns.code = _read_code(ns)
    client = _client(ns, stall_timeout=ns.stall_timeout)
    broker_id = await client.broker_id()
    client.device = _device_or_none(broker_id)  # signs a claim in where the broker wants it
    incoming = await _claim_or_resume(ns, client, broker_id)
    return await _consent_and_accept(ns, incoming, broker_id)


async def _consent_and_accept(ns: argparse.Namespace, incoming: Incoming, broker_id: str) -> int:
    """Show the offer, ask (unless --yes or resumed), receive it; the exit code."""
    try:
        dest = Path(ns.dest)
        try:
            _show_offer(ns, incoming, dest)
        except CliError:
            # The sender learns why, but not where this side wanted to put the files.
            reason = "the receiver does not have enough free space"
            if not incoming.accepted:
                await _cancel_quietly(lambda: incoming.decline(reason))
            raise
        if incoming.accepted:
            if not ns.json:
                _say("Resuming: consent was given when this transfer started.")
        elif not await asyncio.to_thread(_consent, ns):
            await incoming.decline("declined by the receiver")
            if ns.json:
                _emit({"event": "declined", "session": incoming.name})
            else:
                _say("Declined.")
            return 1
        events = _Events(ns.json, "receiving")
        try:
            result = await incoming.accept(
                dest, overwrite=ns.overwrite, on_event=events, via=ns.via
            )
        except (DestinationExistsError, UnsafePathError) as exc:
            reason = str(exc)  # names files by their path in the transfer only
            if not incoming.accepted:
                await _cancel_quietly(lambda: incoming.decline(reason))
            raise
        finally:
            events.close()
        _finish(ns, result, "Received")
        _drop_superseded(dest, broker_id, incoming.name, [f.local_path for f in incoming.files])
        return 0
    finally:
        await incoming.close()


def _drop_superseded(dest: Path, broker_id: str, done: str, paths: list[str]) -> None:
    """Forget this machine's unfinished receives into ``dest`` from a broker that is not this
    one (it lost its state, say), and delete their hidden partial copies of the files that
    just arrived whole: those transfers could never finish (the names are taken) and nothing
    else would remove them. Only names of this transfer are touched, in ``dest`` only."""
    for name, entry in list(_state.load().items()):
        if (
            name == done
            or entry.get("role") != "receiver"
            or entry.get("dest") != str(dest)
            or entry.get("broker_id") == broker_id
            or not name.startswith("sessions/")
        ):
            continue
        remove_partial(dest, name, paths)
        _state.forget(name)


# -- people: login, peers, inbox, send --to, receive OFFER_ID / --from / --watch ------


def _new_device_teller(ns: argparse.Namespace) -> Any:
    """Says when a device is pinned for the first time (trust on first use)."""

    def tell(user: str, device: PeerDevice) -> None:
        if ns.json:
            _emit(
                {
                    "event": "new_device",
                    "user": user,
                    "device": device.display_name,
                    "device_id": device.device_id,
                    "fingerprint": device.fingerprint,
                }
            )
        else:
            _say(
                f"{shown(user, _PERSON_CHARS)} has a new device: "
                f"{shown(device.display_name, _PERSON_CHARS)} (fingerprint {device.fingerprint})"
            )

    return tell


def _device_or_none(broker_id: str) -> Device | None:
    """This machine's device at the broker, for codes (which need none unless the broker
    takes codes from signed-in devices only): a damaged file is then no reason to fail."""
    try:
        return Device.load(broker_id)
    except FerryError:
        return None


async def _people_client(ns: argparse.Namespace, **options: Any) -> tuple[Client, str, Device]:
    """A Client with this machine's device at the broker (NotEnrolled if it has none)."""
    client = _client(ns, on_new_device=_new_device_teller(ns), **options)
    broker_id = await client.broker_id()
    device = Device.load(broker_id)
    if device is None:
        raise NotEnrolled(
            f"this machine has no device at the broker {escape_name(ns.broker)}: "
            "ferry login with the enrollment token the operator gave you"
        )
    client.device = device
    return client, broker_id, device


def _read_enrollment_token(ns: argparse.Namespace, enrolled: bool) -> str:
    """The token: the argument, else FERRY_ENROLLMENT_TOKEN, else asked for (not on argv
    is better: other local users can read a process's arguments). "" if this machine is
    enrolled already and none was given (then login only signs in)."""
    token = ns.token or os.environ.get("FERRY_ENROLLMENT_TOKEN", "")
    if not token and not enrolled:
        if sys.stdin.isatty():
            import getpass

            token = getpass.getpass("Enrollment token: ")
        else:
            token = sys.stdin.readline()
        if not token.strip():
            raise CliError("no enrollment token given (argument, FERRY_ENROLLMENT_TOKEN, or typed)")
    return token.strip()


async def _login(ns: argparse.Namespace) -> int:
    client = _client(ns, on_new_device=_new_device_teller(ns))
    broker_id = await client.broker_id()
    existing = Device.load(broker_id)
    token = _read_enrollment_token(ns, existing is not None)
    if token:
        device = await client.login(token, ns.name or socket.gethostname())
        verb = "Enrolled"
    else:
        assert existing is not None
        client.device = device = existing
        await client.sign_in()
        verb = "Signed in"
    if ns.json:
        _emit(
            {
                "event": "logged_in",
                "user": device.user,
                "organization": device.organization,
                "device": device.display_name,
                "device_id": device.device_id,
                "fingerprint": device.fingerprint,
                "enrolled": bool(token),
            }
        )
    else:
        _say(
            f"{verb} as {shown(device.user, _PERSON_CHARS)} "
            f"(organisation {shown(device.organization, _PERSON_CHARS)}); this device: "
            f"{shown(device.display_name, _PERSON_CHARS)}, fingerprint {device.fingerprint}"
        )
        if token and existing is not None:
            _say("This machine's earlier device at this broker was replaced by this one.")
    return 0


async def _peers(ns: argparse.Namespace) -> int:
    client, broker_id, device = await _people_client(ns)
    if ns.forget:
        dropped = KnownDevices().forget(broker_id, ns.forget)
        _say(
            f"Forgot {dropped} pinned device(s) of {shown(ns.forget, _PERSON_CHARS)}; their "
            "keys are pinned anew when next seen."
        )
    for peer in await client.peers():
        if ns.json:
            _emit(
                {
                    "event": "peer",
                    "user": peer.user,
                    "online": peer.online,
                    "devices": [
                        {
                            "device_id": d.device_id,
                            "name": d.display_name,
                            "fingerprint": d.fingerprint,
                            "online": d.online,
                            "this_device": d.device_id == device.device_id,
                        }
                        for d in peer.devices
                    ],
                }
            )
            continue
        online = sum(d.online for d in peer.devices)
        print(
            terminal_line(
                f"{shown(peer.user, _PERSON_CHARS)}  {len(peer.devices)} device(s), {online} online"
            )
        )
        for d in peer.devices:
            mark = "  (this device)" if d.device_id == device.device_id else ""
            state = "online " if d.online else "offline"
            print(
                terminal_line(
                    f"  {state}  {shown(d.display_name, _PERSON_CHARS)}  {d.fingerprint}{mark}"
                )
            )
    return 0


def _offer_line(offer: InboxOffer) -> dict[str, Any]:
    return {
        "event": "offer",
        "id": offer.id,
        "session": offer.name,
        "from": offer.sender_user,
        "device": offer.sender_device,
        "fingerprint": offer.sender_fingerprint,
        "files": [{"path": f.path, "size": f.size} for f in offer.files],
        "bytes": offer.total_size,
        "expire_time": _iso(min(offer.expire_time, offer.not_after)),
    }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _show_inbox_offer(ns: argparse.Namespace, offer: InboxOffer) -> None:
    if ns.json:
        _emit(_offer_line(offer))
        return
    first = shown(offer.files[0].path, _NAME_CHARS) if offer.files else ""
    more = f" and {len(offer.files) - 1} more" if len(offer.files) > 1 else ""
    print(
        terminal_line(
            f"{offer.id[:12]}  from {shown(offer.sender_user, _PERSON_CHARS)} "
            f"({shown(offer.sender_device, _PERSON_CHARS)})  {first}{more}  "
            f"{format_size(offer.total_size)}  until "
            f"{_iso(min(offer.expire_time, offer.not_after))}"
        )
    )


async def _inbox(ns: argparse.Namespace) -> int:
    client, _, _ = await _people_client(ns)
    offers = await client.list_inbox()
    for offer in offers:
        _show_inbox_offer(ns, offer)
    if not offers and not ns.json:
        _say("No offers waiting.")
    return 0


async def _send_to(ns: argparse.Namespace) -> int:
    """`ferry send --to USER`: an offer to a person's devices (no code)."""
    client, broker_id, _ = await _people_client(ns)
    sources = [str(p.absolute()) for p in ns.paths]
    found = _state.find("sender", broker_id, sources=sources, to=ns.to, done=None)
    outgoing: Outgoing | None = None
    if found is not None:
        name, entry = found
        try:
            stamps = [SourceStamp.from_text(t) for t in entry.get("stamps") or []] or None
            outgoing = await client.resume_offer(
                name,
                entry["token"],
                ns.paths,
                via=entry.get("via", ns.via),
                stamps=stamps,
                key=bytes.fromhex(entry.get("key", "")),
            )
        except SourceChangedError:
            _state.forget(name)
            raise
        except (TransferOver, ValueError):
            _state.forget(name)
        except BrokerError as exc:
            if exc.reason not in _UNKNOWN_SESSION:
                raise
            _state.forget(name)
    resumed = outgoing is not None
    recipient = await client.recipient(ns.to)
    online = any(d.online for d in recipient.devices)
    who = shown(ns.to, _PERSON_CHARS)
    if outgoing is None:
        via = ns.via
        if not online and via == "auto":
            via = "store"  # nobody to connect to now: upload at once, if the broker can keep it
        outgoing = await client.offer(
            ns.paths, chunk_size=ns.chunk_size, ttl=_ttl(ns, PERSON_TTL), via=via, to=ns.to
        )
        assert outgoing.key is not None
        _remember_sent(
            ns, outgoing, broker_id, sources, to=ns.to, via=via, key=outgoing.key.secret.hex()
        )
    try:
        devices = len(recipient.devices)
        if ns.json:
            _emit(
                {
                    "event": "resumed" if resumed else "offered",
                    "session": outgoing.name,
                    "to": ns.to,
                    "devices": devices,
                    "online": online,
                    "via": outgoing.via,
                    "files": len(outgoing.files),
                    "bytes": outgoing.total_size,
                }
            )
        else:
            verb = "Resuming" if resumed else "Offering"
            _say(
                f"{verb} {len(outgoing.files)} file(s) ({format_size(outgoing.total_size)}) "
                f"to {who} ({devices} device(s), {'online' if online else 'offline'})."
            )
            if outgoing.via == "store" and not online:
                _say(f"{who} is offline: putting the files in the object store for them")
            elif not online:
                _say(f"{who} is offline: waiting for one of their devices to take the offer")
        return await _transfer(ns, outgoing, who)
    finally:
        await outgoing.close()


async def _transfer(ns: argparse.Namespace, outgoing: Outgoing, who: str = "") -> int:
    """The sender's transfer and its result line. An offer to a person (``who``) that the
    broker cannot store (no bucket, store-and-forward off) waits for them instead."""
    events = _Events(ns.json, "sending")
    try:
        try:
            result = await outgoing.transfer(on_event=events)
        except TransferError as exc:
            if not who or outgoing.via != "store" or not store_refused(exc):
                raise
            outgoing.via = "auto"
            _state.update(outgoing.name, via="auto")
            if ns.json:
                _emit({"event": "waiting", "session": outgoing.name, "reason": "no_store"})
            else:
                _say(f"This broker keeps no files: waiting for {who} to take the offer")
            result = await outgoing.transfer(on_event=events)
    except (asyncio.CancelledError, KeyboardInterrupt):
        await _cancel_quietly(outgoing.cancel)
        raise
    finally:
        events.close()
    if result.stored:
        _stored(ns, outgoing, result)
    else:
        _finish(ns, result, "Sent")
    # Only after the result is out: from now on `ferry send` of these files is a new offer.
    _state.update(outgoing.name, done=True)
    return 0


async def _receive_person(ns: argparse.Namespace) -> int:
    """`ferry receive OFFER_ID`, `--from USER` or `--watch`: offers made to this user."""
    client, broker_id, _ = await _people_client(ns, stall_timeout=ns.stall_timeout)
    if ns.watch:
        return await _watch(ns, client, broker_id)
    if ns.from_user:
        name = await _oldest_from(ns, client, ns.from_user)
    else:
        name = await _resolve_offer(client, broker_id, ns.code)
    incoming = await _take_or_resume(ns, client, broker_id, name)
    return await _consent_and_accept(ns, incoming, broker_id)


async def _resolve_offer(client: Client, broker_id: str, text: str) -> str:
    """The session name of the offer ``text`` names: an id or a unique prefix of one, in
    the inbox (or among this machine's unfinished receives)."""
    text = text.removeprefix("sessions/")
    names = {o.name for o in await client.list_inbox() if o.id.startswith(text)}
    names |= {
        name
        for name, entry in _state.load().items()
        if entry.get("role") == "receiver"
        and entry.get("broker_id") == broker_id
        and entry.get("offer")
        and name.removeprefix("sessions/").startswith(text)
    }
    if len(names) > 1:
        raise CliError(f"{text} names {len(names)} offers: give more of its id")
    if names:
        return names.pop()
    if len(text) == 32:
        return f"sessions/{text}"  # not waiting (taken here earlier?): the broker will say
    raise CliError(f"no offer {text} in the inbox (ferry inbox lists them)")


async def _oldest_from(ns: argparse.Namespace, client: Client, user: str) -> str:
    """The oldest offer waiting from ``user``, waiting for one if there is none."""
    for offer in await client.list_inbox():
        if offer.sender_user == user:
            return offer.name
    if not ns.json:
        _say(f"Waiting for an offer from {shown(user, _PERSON_CHARS)} (Ctrl-C to stop)")
    async for update in client.inbox():
        for offer in update.offers:
            if offer.sender_user == user:
                return offer.name
    raise CliError("the inbox closed")  # only for a bounded inbox, which this is not


async def _take_or_resume(
    ns: argparse.Namespace, client: Client, broker_id: str, name: str
) -> Incoming:
    """Resume this machine's unfinished receive of offer ``name``, else take it."""
    found = _state.find("receiver", broker_id, offer=name)
    if found is not None and found[1].get("token") and found[1].get("key"):
        try:
            incoming = await client.resume_claim(
                name, found[1]["token"], bytes.fromhex(found[1]["key"])
            )
        except BrokerError as exc:
            if exc.reason not in _UNKNOWN_SESSION:
                raise
            _state.forget(name)
        else:
            _state.update(name, broker=ns.broker)
            return incoming
    incoming = await client.take(name)
    _remember_received(ns, incoming, broker_id, offer=name)
    return incoming


async def _watch(ns: argparse.Namespace, client: Client, broker_id: str) -> int:
    """`ferry receive --watch`: each new offer is shown and asked about (or accepted from
    the --accept-from senders); ends on Ctrl-C or at the end of stdin.

    The inbox keeps being read while a question waits for its answer: an offer that leaves
    meanwhile (another of this person's devices took it, its sender cancelled it) withdraws
    the question, and the next answer typed is not taken for it."""
    trusted = {u.strip() for u in (ns.accept_from or "").split(",") if u.strip()}
    names = await _own_devices(client)
    seen: set[str] = set()
    waiting: list[InboxOffer] = []
    if not ns.json:
        _say(f"Watching the inbox; files go to {escape_name(str(ns.dest))} (Ctrl-C to stop)")
    updates = aiter(client.inbox())
    answers = _Lines()
    pending: asyncio.Future[InboxUpdate] | None = None  # the inbox's next update
    asking: InboxOffer | None = None  # the offer whose question waits for an answer
    try:
        while True:
            if asking is None and waiting:
                offer = waiting.pop(0)
                _show_inbox_offer(ns, offer)
                if offer.sender_user in trusted:
                    await _watch_one(ns, client, broker_id, offer.name)
                    continue
                if not ns.json:
                    sys.stderr.write("Accept? [y/N] ")
                    sys.stderr.flush()
                asking = offer
            if pending is None:
                pending = asyncio.ensure_future(anext(updates))
            if asking is None:
                update = await pending
                pending = None
            else:
                line = answers.next()
                either: set[asyncio.Future[Any]] = {line, pending}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not pending.done():
                    answer = line.result()
                    if not answer:
                        return 0  # end of input: nobody left to ask
                    offer, asking = asking, None
                    if answer.strip().lower() in ("y", "yes"):
                        await _watch_one(ns, client, broker_id, offer.name)
                    elif ns.json:
                        _emit({"event": "skipped", "session": offer.name})
                    continue
                update = pending.result()
                pending = None
            gone_names = {g.name for g in update.gone}
            if asking is not None and asking.name in gone_names:
                if not ns.json:
                    sys.stderr.write("\n")  # the question is withdrawn: said just below
                asking = None
            waiting = [o for o in waiting if o.name not in gone_names]
            for gone in update.gone:
                _show_gone(ns, gone, client, names)
            for offer in update.offers:
                if offer.name not in seen:
                    seen.add(offer.name)
                    waiting.append(offer)
    except StopAsyncIteration:
        return 0
    finally:
        if pending is not None:
            pending.cancel()
        answers.close()


class _Lines:
    """Lines of stdin read without blocking the event loop, and whose reading can be
    abandoned: a question withdrawn does not keep a thread that would take the next line."""

    def __init__(self) -> None:
        self._task: asyncio.Future[str] | None = None

    def next(self) -> asyncio.Future[str]:
        """The next line (\"\" at the end of input); the same future until it is done."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
        return self._task

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _own_devices(client: Client) -> dict[str, str]:
    """This person's devices, by id: their names, to say which one took an offer."""
    device = client.device
    if device is None:
        return {}
    try:
        peers = await client.peers(device.user)  # this person only, not the organisation
    except FerryError:
        return {}
    return {d.device_id: d.display_name for p in peers if p.user == device.user for d in p.devices}


async def _watch_one(ns: argparse.Namespace, client: Client, broker_id: str, name: str) -> None:
    """Take and receive one offer; a failure is said, and the watch goes on."""
    try:
        incoming = await _take_or_resume(ns, client, broker_id, name)
    except BrokerError as exc:
        if exc.reason not in ("OFFER_TAKEN", "OFFER_NOT_FOUND"):
            raise
        if ns.json:
            _emit({"event": "not_taken", "session": name, "reason": exc.reason})
        else:
            _say(f"Not taken: {exc}")
        return
    except (TamperedError, DeviceKeyChanged, TransferOver) as exc:
        if ns.json:
            _emit({"event": "refused", "session": name, "error": str(exc)})
        _say(f"ferry: refused the offer: {exc}")
        return
    yes = ns.yes
    ns.yes = True  # consent was given when the offer was shown
    try:
        await _consent_and_accept(ns, incoming, broker_id)
    except TransferError as exc:
        _say(f"ferry: receiving failed: {exc}")
    finally:
        ns.yes = yes


def _show_gone(
    ns: argparse.Namespace, gone: GoneOffer, client: Client, names: dict[str, str] | None = None
) -> None:
    device = client.device
    here = device is not None and gone.taken_by == device.device_id
    if ns.json:
        _emit(
            {
                "event": "gone",
                "id": gone.id,
                "session": gone.name,
                "taken_by": gone.taken_by,
                "taken_here": here,
                "state": gone.state,
                "reason": gone.reason,
            }
        )
    elif gone.taken_by and not here:
        which = shown((names or {}).get(gone.taken_by, gone.taken_by), _PERSON_CHARS)
        _say(f"Offer {gone.id[:12]} was taken by another of your devices ({which}).")
    elif not gone.taken_by:
        why = f": {gone.reason}" if gone.reason else ""
        _say(f"Offer {gone.id[:12]} is gone ({gone.state or 'ended'}{why}).")


# -- status, digest, serve ------------------------------------------------------------


async def _status(ns: argparse.Namespace) -> int:
    """Each session's state as its broker has it, or what is known here when the broker
    does not answer (or is another broker now: no token is sent to a broker of another id)."""
    from ferry.v1 import broker_pb2

    known = _state.load()
    names = [ns.session] if ns.session else [n for n, e in known.items() if e.get("token")][-10:]
    if not names:
        raise CliError("no sessions known on this machine yet")
    ids: dict[str, str | BrokerError] = {}
    for name in names:
        if not name.startswith("sessions/"):
            name = f"sessions/{name}"
        entry = known.get(name)
        if entry is None:
            raise CliError(f"no token for {escape_name(name)} on this machine")
        address = ns.broker if ns.broker_given else entry["broker"]
        client = Client(
            address,
            broker_wait=min(ns.broker_wait, 5.0),
            broker_ca=ns.broker_ca,
            broker_cert=ns.broker_cert,
            broker_key=ns.broker_key,
            insecure_plaintext=ns.insecure_plaintext,
        )
        line: dict[str, Any] = {"session": name, "role": entry["role"], "broker": address}
        if address not in ids:
            try:
                ids[address] = await client.broker_id()
            except BrokerError as exc:
                ids[address] = exc
        found = ids[address]
        if isinstance(found, BrokerError):
            line.update(state="unknown", error=f"the broker did not answer: {found}")
        elif found != entry.get("broker_id"):
            line.update(
                state="unknown",
                error="the broker there is not the one that had this session "
                "(it lost its state, or another broker took its address)",
            )
        else:
            session = await client.session(name, entry["token"])
            line.update(
                state=broker_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower(),
                bytes_done=session.bytes_done,
                bytes=sum(f.size_bytes for f in session.manifest.files),
                failure_reason=session.failure_reason[:_REASON_CHARS],
            )
        if entry.get("dest"):
            line["dest"] = entry["dest"]
        if ns.json:
            _emit(line)
            continue
        text = f"{name}  {entry['role']}  {line['state']}"
        if line.get("failure_reason"):
            text += f" ({shown(line['failure_reason'])})"
        if "bytes" in line:
            text += f"  {format_size(line['bytes_done'])} / {format_size(line['bytes'])}"
        if "error" in line:
            text += f"  broker {escape_name(address)}: {escape_name(line['error'])}"
        _say(text)
    return 0


def _digest(ns: argparse.Namespace) -> int:
    from ferry.client import digest_file

    for path in ns.files:
        digest = digest_file(path, ns.chunk_size).hex()
        print(terminal_line(f"{digest}  {escape_name(str(path))}"))
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from ferry.broker import config_from_arguments, configure_logging, serve

    try:
        config = config_from_arguments(ns)
    except ValueError as exc:
        _fail(ns, str(exc), 2)
    configure_logging(ns)
    asyncio.run(serve(config))
    return 0


# -- arguments ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Move files between machines.")
    sub = p.add_subparsers(dest="command", required=True)

    def client_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--broker",
            default=os.environ.get("FERRY_BROKER", DEFAULT_BROKER),
            help="broker address: grpcs://HOST:PORT (TLS), grpc://HOST:PORT (plaintext, "
            "loopback only) or HOST:PORT (TLS unless loopback) (env FERRY_BROKER)",
        )
        sp.add_argument(
            "--broker-ca",
            metavar="FILE",
            default=os.environ.get("FERRY_BROKER_CA") or None,
            help="trust only these CA certificates (PEM) for the broker's TLS certificate "
            "(env FERRY_BROKER_CA; default: the system's trust store)",
        )
        sp.add_argument(
            "--broker-cert",
            metavar="FILE",
            default=os.environ.get("FERRY_BROKER_CERT") or None,
            help="this client's certificate (PEM), for a broker that requires one "
            "(env FERRY_BROKER_CERT)",
        )
        sp.add_argument(
            "--broker-key",
            metavar="FILE",
            default=os.environ.get("FERRY_BROKER_KEY") or None,
            help="the client certificate's private key (PEM) (env FERRY_BROKER_KEY)",
        )
        sp.add_argument(
            "--insecure-plaintext",
            action="store_true",
            default=os.environ.get("FERRY_INSECURE_PLAINTEXT", "").strip() == "1",
            help="allow grpc:// to a broker that is not on this machine: the code and "
            "party token cross the network in clear (env FERRY_INSECURE_PLAINTEXT=1)",
        )
        sp.add_argument(
            "--ports",
            type=_ports,
            default=_ports(os.environ.get("FERRY_PORTS", _DEFAULT_PORTS)),
            help="ports this side may listen on (env FERRY_PORTS)",
        )
        sp.add_argument(
            "--broker-wait",
            type=float,
            metavar="S",
            default=float(os.environ.get("FERRY_BROKER_WAIT", DEFAULT_BROKER_WAIT)),
            help="how long to keep trying a broker that is down or restarting, in seconds "
            f"(env FERRY_BROKER_WAIT, default {DEFAULT_BROKER_WAIT:g})",
        )
        sp.add_argument("--json", action="store_true", help="one JSON object per line")

    def via_opt(sp: argparse.ArgumentParser, store: str) -> None:
        sp.add_argument(
            "--via",
            choices=("auto", "direct", "store"),
            default=os.environ.get("FERRY_VIA", "auto"),
            help=f"direct: peer to peer only; store: {store}; auto (default): direct, "
            "through the object store if no direct connection is up by the deadline",
        )

    def verify_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--verify",
            action="store_true",
            help="show words derived from the code's key, to compare with the other side's "
            "over another channel (the same words mean nobody sat in between)",
        )

    s = sub.add_parser("serve", help="run a broker")
    add_broker_arguments(s)  # the flags of `python -m ferry.broker`; env read in _serve

    s = sub.add_parser("send", help="offer files and folders; prints a one-time code")
    s.add_argument("paths", nargs="+", type=Path)
    s.add_argument(
        "--to",
        metavar="USER",
        help="offer them to this user's devices instead of with a code (ferry login first)",
    )
    s.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE)
    s.add_argument(
        "--ttl",
        type=float,
        default=None,
        help="seconds the offer stays valid (default 600 for a code, 86400 with --to: a"
        " person may be away; the broker may allow less)",
    )
    via_opt(s, "upload now and exit; the receiver fetches it until the code expires")
    verify_opt(s)
    client_opts(s)

    s = sub.add_parser("receive", help="receive what a code, or an offer to you, offers")
    s.add_argument(
        "code",
        nargs="?",
        default="",
        help="the code, better left out (env FERRY_CODE, or asked for): other users of a "
        "machine can read the arguments of its processes; or an offer's id from ferry inbox "
        "(6 characters or more)",
    )
    s.add_argument(
        "--from", dest="from_user", metavar="USER", help="the oldest offer from USER (waits)"
    )
    s.add_argument(
        "--watch", action="store_true", help="wait for offers and ask about each (Ctrl-C ends)"
    )
    s.add_argument(
        "--accept-from",
        metavar="USER,...",
        default="",
        help="with --watch: accept offers from these users without asking",
    )
    s.add_argument("--dest", default=".", help="folder to receive into (default: here)")
    s.add_argument("--yes", "-y", action="store_true", help="accept without asking")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="give up when the sender sends nothing for this many seconds",
    )
    via_opt(s, "only fetch from the object store")
    verify_opt(s)
    client_opts(s)

    s = sub.add_parser("login", help="enroll this machine as a device of your user")
    s.add_argument(
        "token",
        nargs="?",
        default="",
        help="the operator's enrollment token, better left out (env FERRY_ENROLLMENT_TOKEN, "
        "or asked for); without one, an enrolled machine signs in",
    )
    s.add_argument("--name", default="", help="this device's name (default: the host name)")
    client_opts(s)

    s = sub.add_parser("peers", help="the users you may send to, with their devices")
    s.add_argument(
        "--forget",
        metavar="USER",
        default="",
        help="forget USER's pinned device keys (after checking a changed fingerprint)",
    )
    client_opts(s)

    s = sub.add_parser("inbox", help="the offers waiting for you")
    client_opts(s)

    _add_admin(sub)

    s = sub.add_parser("status", help="show the state of recent sessions")
    s.add_argument("session", nargs="?")
    client_opts(s)

    s = sub.add_parser("digest", help="print files' blake3-chunks digests")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE)
    return p


def _add_admin(sub: Any) -> None:
    """`ferry admin ...`: the operator's commands (ferry.broker.admin), if installed."""
    try:
        from ferry.broker.admin import add_admin_parser
    except ImportError:
        return
    add_admin_parser(sub)


def _run_admin(ns: argparse.Namespace) -> int:
    from ferry.broker.admin import run_admin

    return run_admin(ns)


def _fail(ns: argparse.Namespace | None, message: str, code: int = 1) -> NoReturn:
    # One line, whatever the error quotes: whitespace collapsed, then the terminal guard
    # (the JSON line gets the same bounded text).
    message = terminal_line(" ".join(message.split()))
    if ns is not None and getattr(ns, "json", False):
        _emit({"event": "failed", "error": message})
    _say(f"ferry: error: {message}")
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `ferry` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    ns.broker_given = "--broker" in argv or any(a.startswith("--broker=") for a in argv)
    try:
        if ns.command == "serve":
            code = _serve(ns)
        elif ns.command == "digest":
            code = _digest(ns)
        elif ns.command == "admin":
            code = _run_admin(ns)
        else:
            runner = {
                "send": _send,
                "receive": _receive,
                "status": _status,
                "login": _login,
                "peers": _peers,
                "inbox": _inbox,
            }[ns.command]
            code = asyncio.run(runner(ns))
    except KeyboardInterrupt:
        _fail(ns, "interrupted", 130)
    except (FerryError, OSError) as exc:  # every error Ferry means, and the system's
        _fail(ns, str(exc))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
