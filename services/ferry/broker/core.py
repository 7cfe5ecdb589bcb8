"""The broker's domain logic: offers, claims, consent, progress, expiry, over a Store.

gRPC-free: methods take protos and plain values, return protos, and raise the refusals of
errors.py (a reason and a message, no status code). The servicer (service.py) only unpacks
calls and maps refusals to statuses. All times come from the injected clock (seconds since the
epoch), so tests can move time.

Store calls are awaited (store.py): while one waits for its answer (a Redis round trip) the
event loop runs other calls, so calls of one process interleave between a read and the write
that follows it exactly as calls on two replicas do. One mechanism covers both: every write
of a session is a compare-and-set on its version (StaleRecord), which surfaces as
Aborted/CONFLICT, or makes a claim look again (`_Raced`) and an expiry re-read what the other
writer stored. What is kept in this process across awaits is made safe the same way: a
session's publication to the hub carries its version (the hub never replaces a newer snapshot
with an older one), retried CreateOffers with one request_id run one at a time (`_requests`),
and a report tells the caller whether it was the one that made the change.

Codes and keys: the broker finds an offer by its nameplate (the broker's part of the code;
the password never comes here) and relays the peers' SPAKE2 messages and key confirmations
without being able to check them. What it does enforce: a nameplate is claimed once; until
the sender has confirmed the key (which it does only after checking the receiver's proof),
the receiver sees nothing of the offer but the sender's PAKE message (`view`); acceptance
waits for that confirmation; a resume never replaces a PAKE message or a confirmation. A
store-and-forward offer has no PAKE: its claim must present the verifier the sender gave.

Acceptance and every resume after it start a connection attempt the same way
(:meth:`Broker._negotiate`): lease the listener's ports, set the plan, write; a failed write
gives the lease back to what the stored plan says.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from ferry.broker import codes, leases, states, validation
from ferry.broker.accounts import Accounts, Principal, device_proto, manifest_summary
from ferry.broker.config import BrokerConfig
from ferry.broker.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unauthenticated,
)
from ferry.broker.hub import Hub, WatchLimits
from ferry.broker.ledger import LocalLedger
from ferry.broker.ratelimit import CallLimiter, ClaimLimiter, SourceLimiter
from ferry.broker.states import Event, Party
from ferry.broker.store import CodeTaken, SessionRecord, StaleRecord, StorageFull, Store
from ferry.v1 import broker_pb2

log = logging.getLogger(__name__)

Clock = Callable[[], float]

_SWEEP_BATCH = 500
# Rough cost of an offer's row beside its manifest (peer info, tokens, times), for the disk check.
_ROW_OVERHEAD_BYTES = 64 << 10
_NAMEPLATE_TRIES = 20
_CLAIM_TRIES = 3
_CONNECTABLE = frozenset({states.ACCEPTED, states.CONNECTING, states.TRANSFERRING})
#: What one inbox response (ListInbox, WatchInbox) holds at most, beyond its first offer:
#: the rest wait for a later one (`more` says how many). With max_manifest_bytes of 1 MiB, a
#: response stays within gRPC's default 4 MiB, and a device that does not read holds no more.
INBOX_RESPONSE_BYTES = 1 << 20
_AUDIT_TRIM_EVERY_S = 3600.0


def timestamp(seconds: float) -> Timestamp:
    """A Timestamp for seconds since the epoch."""
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def _no_nameplate() -> ResourceExhausted:
    return ResourceExhausted(
        Reason.NAMEPLATES_EXHAUSTED, "the broker holds too many offers; try again later"
    )


def _not_found() -> NotFound:
    return NotFound(Reason.CODE_NOT_FOUND, "no offer has this code")


def confirmed(session: broker_pb2.Session) -> bool:
    """Whether the sender has confirmed the key, which shows the receiver the offer."""
    return bool(session.sender.key_confirmation)


def view(session: broker_pb2.Session, party: Party) -> broker_pb2.Session:
    """The session as ``party`` may see it.

    Before the sender confirmed the key, the receiver (who may be a guesser holding only a
    nameplate) sees the session's name, state and times and the sender's PAKE message:
    no manifest, no address, no certificate. Until the offer is accepted it sees no address
    of the sender's either: candidates are revealed only to a receiver that consented.
    """
    if party is not Party.RECEIVER or (confirmed(session) and session.state != states.OFFERED):
        return session
    out = broker_pb2.Session()
    out.CopyFrom(session)
    if confirmed(session):
        del out.sender.candidates[:]
        return out
    out.ClearField("manifest")
    out.ClearField("sender")
    out.sender.pake_message = session.sender.pake_message
    return out


def inbox_view(session: broker_pb2.Session) -> broker_pb2.Session:
    """An offer to a person as the recipient's devices see it in their inbox: no address of
    the sender's before one of them consented. Every key envelope stays: the sender's
    signature covers them all (each opens only on its own device)."""
    out = broker_pb2.Session()
    out.CopyFrom(session)
    del out.sender.candidates[:]
    return out


def inbox_key(user: str) -> str:
    """The hub key that wakes the inbox streams of ``user``'s devices (never a session id,
    which is hex)."""
    return f"inbox:{user}"


class Broker:
    """Everything the BrokerService does, minus gRPC."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        clock: Clock = time.time,
        hub: Hub | None = None,
        token_key: bytes | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # Keys the tokens of repeated claims (codes.derived_token); persisted by the server.
        self.token_key = token_key or secrets.token_bytes(32)
        self.clock = clock
        self.hub = hub or Hub(
            WatchLimits(
                config.watches_per_party,
                config.watches_per_address,
                config.watches_total,
                config.watch_bytes_total,
            )
        )
        # Limits, claim times and retry answers: shared by the replicas of one Redis
        # (ledger.py), so spreading calls over replicas gains a guesser nothing.
        self.ledger = store.ledger()
        # Calls of any kind per source (checked by the servicer before a call is handled): in
        # this process only, on purpose: it guards this process's event loop, and costs no
        # round trip to a shared store on every call.
        self.calls = CallLimiter(
            LocalLedger(clock), config.calls_burst_per_address, config.calls_rate_per_address
        )
        self.offers = SourceLimiter(
            self.ledger,
            "offer",
            config.offer_burst_per_address,
            config.offer_refill_per_address_s,
        )
        self.limiter = ClaimLimiter(
            self.ledger,
            config.claim_burst_per_ip,
            config.claim_refill_per_ip_s,
            config.claim_burst_global,
            config.claim_refill_global_s,
            flood_cost=config.claim_flood_cost,
            ipv4_prefix=config.caller_ipv4_prefix,
            ipv6_prefix=config.caller_ipv6_prefix,
            guesses_kept_s=config.offer_ttl_max_s,
        )
        # The request ids of the CreateOffers running now, each with a lock that a retry of
        # one waits for: a retry arriving while its first call awaits the store must find
        # the first call's offer, not make a second one (or be told the id is reused).
        self._requests: dict[str, _Pending] = {}
        #: People: devices, sign-in, presence, policy, audit (issue 13).
        self.accounts = Accounts(config, store, self.token_key, self.limiter, clock)
        self._audit_trimmed = float("-inf")

    async def broker_id(self) -> str:
        """This broker's stable id, kept in (and shared through) its store."""
        return await self.store.broker_id()

    # -- offers -----------------------------------------------------------------------------

    async def create_offer(
        self,
        request: broker_pb2.CreateOfferRequest,
        peer_ip: str | None,
        principal: Principal | None = None,
    ) -> broker_pb2.CreateOfferResponse:
        """Record an offer; a retried request_id gets the first response back.

        A new offer (not a retry) is refused with RESOURCE_EXHAUSTED while the caller's
        address (a signed-in ``principal``: its user) has no offer allowance left
        (RATE_LIMITED, OFFER_QUOTA_EXCEEDED) or the data dir is nearly full (STORAGE_FULL,
        before anything is written: the space left serves the live sessions).

        With ``request.recipient`` it is an offer to a person (the caller must be signed
        in; see Accounts.check_person_offer): no code, the key sealed to the recipient's
        devices, and the offer waits in the recipient's inbox.
        """
        now = self.clock()
        validation.check_manifest(request.manifest, self.config.max_manifest_bytes)
        validation.check_peer(request.sender, "sender")
        if request.HasField("ttl"):
            validation.check_duration(request.ttl, "ttl")
        validation.check_key_field(request.claim_verifier, "claim_verifier")
        self._check_offer_size(request.manifest)
        if request.recipient:
            if principal is None:
                raise Unauthenticated(
                    Reason.ACCESS_TOKEN_MISSING,
                    "an offer to a person needs a signed-in device (ferry login)",
                )
            await self.accounts.check_person_offer(principal, request, now)
        else:
            await self.accounts.check_anonymous(principal, "offers")
            self._check_code_offer(request)
            if request.key_envelopes or request.offer_signature or request.HasField("not_after"):
                raise InvalidArgument(
                    Reason.INVALID_ARGUMENT,
                    "key_envelopes, offer_signature and not_after belong to an offer to a"
                    " person (set recipient)",
                )
        validation.check_request_id(request.request_id)
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        if not request.request_id:
            return await self._new_offer(request, peer_ip, fingerprint, now, principal)
        async with self._one_request(_request_key(request.request_id)):
            now = self.clock()  # a retry may have waited for the first call
            replay = await self._replay(request.request_id, fingerprint, now)
            if replay is not None:
                return replay
            return await self._new_offer(request, peer_ip, fingerprint, now, principal)

    def _check_offer_size(self, manifest: broker_pb2.Manifest) -> None:
        """RESOURCE_EXHAUSTED (OFFER_TOO_LARGE) past the operator's largest offer."""
        limit = self.config.max_offer_bytes
        total = sum(entry.size_bytes for entry in manifest.files)
        if limit and total > limit:
            raise ResourceExhausted(
                Reason.OFFER_TOO_LARGE,
                f"this broker takes offers of at most {limit} bytes; this one has {total}",
            )

    def _check_code_offer(self, request: broker_pb2.CreateOfferRequest) -> None:
        """A code offer's keys: a PAKE message, or a store-and-forward claim verifier."""
        if bool(request.sender.pake_message) == bool(request.claim_verifier):
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "an offer needs the sender's pake_message, or for store-and-forward a"
                " claim_verifier (exactly one of them)",
            )
        if request.sender.pake_message and request.sender.key_confirmation:
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "a PAKE offer's key confirmation comes after the claim (ConfirmKey)",
            )

    @contextlib.asynccontextmanager
    async def _one_request(self, key: str) -> AsyncIterator[None]:
        """Run the block for one request id at a time in this process (see `_requests`)."""
        pending = self._requests.get(key)
        if pending is None:
            pending = self._requests[key] = _Pending()
        pending.users += 1
        try:
            async with pending.lock:
                yield
        finally:
            pending.users -= 1
            if not pending.users:
                del self._requests[key]

    async def _new_offer(
        self,
        request: broker_pb2.CreateOfferRequest,
        peer_ip: str | None,
        fingerprint: str,
        now: float,
        principal: Principal | None = None,
    ) -> broker_pb2.CreateOfferResponse:
        """Make the offer of a CreateOffer that is no retry (checked and validated)."""
        await self._check_offer_allowance(request, peer_ip, now, principal)

        ttl = self.config.offer_ttl_default_s
        if request.HasField("ttl"):
            ttl = request.ttl.ToNanoseconds() / 1e9
        ttl = min(max(ttl, self.config.offer_ttl_min_s), self.config.offer_ttl_max_s)
        if request.recipient:  # never past what the sender signed
            ttl = min(ttl, max(request.not_after.seconds - now, 1.0))

        token = codes.new_token()
        session = broker_pb2.Session(
            name=f"sessions/{uuid.uuid4().hex}",
            state=states.OFFERED,
            manifest=request.manifest,
            sender=_with_reflexive(request.sender, peer_ip),
            create_time=timestamp(now),
            update_time=timestamp(now),
            expire_time=timestamp(now + ttl),
        )
        record = SessionRecord(
            session=session,
            sender_token_hash=codes.hash_token(token),
            request_id=_request_key(request.request_id) if request.request_id else None,
            claim_verifier=request.claim_verifier or None,
        )
        code = ""
        if request.recipient:  # no code: the recipient's devices find it in their inbox
            assert principal is not None  # checked by create_offer
            session.person.CopyFrom(
                broker_pb2.PersonOffer(
                    sender_user=principal.user,
                    sender_device=device_proto(principal.device),
                    recipient_user=request.recipient,
                    key_envelopes=request.key_envelopes,
                    offer_signature=request.offer_signature,
                    not_after=request.not_after,
                )
            )
            await self.store.create_session(record)
        else:
            code = await self._create_with_nameplate(record, now)
        response = broker_pb2.CreateOfferResponse(session=session, code=code, party_token=token)
        if request.request_id:
            reply = _Reply(fingerprint, record.session_id, code, token, now + ttl)
            await self._remember(request.request_id, reply, ttl)
        log.info("offer created", extra={"session": session.name})
        if request.recipient:
            self.hub.publish(inbox_key(request.recipient), record.version, session)
        await self.accounts.audit(
            "offer.created",
            {
                "session": session.name,
                **self._parties(session, principal, peer_ip),
                **manifest_summary(session.manifest),
                "expire_time": session.expire_time.ToJsonString(),
            },
            people=bool(request.recipient),
        )
        return response

    async def _create_with_nameplate(self, record: SessionRecord, now: float) -> str:
        """Store a code offer under a free nameplate; return the nameplate.

        The nameplate is looked up free, then taken by the store's create, which refuses it
        (CodeTaken) if another offer took it in between: on another replica, or in this
        process while this call awaited the store.
        """
        for _ in range(_NAMEPLATE_TRIES):
            code, record.code_hash = await self._free_nameplate(now)
            try:
                await self.store.create_session(record)
                return code
            except CodeTaken:
                continue
        raise _no_nameplate()

    @staticmethod
    def _parties(
        session: broker_pb2.Session, principal: Principal | None, peer_ip: str | None
    ) -> dict[str, object]:
        """Who offers to whom, for the audit log: users and devices, or for an anonymous
        code offer the address it came from."""
        if session.HasField("person"):
            return {
                "sender": session.person.sender_user,
                "sender_device": session.person.sender_device.device_id,
                "recipient": session.person.recipient_user,
            }
        if principal is not None:
            return {"sender": principal.user, "sender_device": principal.device_id, "code": True}
        return {"sender": None, "source": peer_ip, "code": True}

    async def _check_offer_allowance(
        self,
        request: broker_pb2.CreateOfferRequest,
        peer_ip: str | None,
        now: float,
        principal: Principal | None = None,
    ) -> None:
        """Refuse a new offer when the disk is nearly full or the caller's allowance is spent
        (a signed-in caller's: its user's offers per hour; an anonymous one's: its address's).

        The disk first: an offer refused for space does not spend the caller's allowance.
        """
        free = await self.store.free_bytes()
        need = self.config.min_free_disk_bytes + request.ByteSize() + _ROW_OVERHEAD_BYTES
        if free is not None and free < need:
            log.warning("new offer refused: the data dir is nearly full", extra={"free": free})
            raise StorageFull(
                "the broker's storage is nearly full; it takes no new offers until sessions"
                " end; try again later"
            )
        if principal is not None:
            await self.accounts.take_offer_allowance(principal, now)
        elif not await self.offers.take(self.limiter.source(peer_ip), now):
            raise ResourceExhausted(
                Reason.RATE_LIMITED, "too many new offers from this address; wait and try again"
            )

    async def _free_nameplate(self, now: float) -> tuple[str, str]:
        """A nameplate no offer that a claim could still find holds, and its hash."""
        for _ in range(_NAMEPLATE_TRIES):
            nameplate = codes.generate()
            code_hash = codes.hash_code(self.token_key, nameplate)
            held = await self.store.find_by_code_hash(code_hash)
            if held is None or (held.session.state in states.FINAL_STATES and held.expire_s < now):
                return nameplate, code_hash
        raise _no_nameplate()

    async def _replay(
        self, request_id: str, fingerprint: str, now: float
    ) -> broker_pb2.CreateOfferResponse | None:
        cached = _Reply.unseal(request_id, await self.ledger.get(_reply_key(request_id)))
        if cached is not None and cached.expire_s > now:
            if cached.fingerprint != fingerprint:
                raise AlreadyExists(
                    Reason.REQUEST_ID_REUSED,
                    "this request_id was already used for a different offer",
                )
            current = await self.store.get_session(cached.session_id)
            if current is not None:
                return broker_pb2.CreateOfferResponse(
                    session=current.session, code=cached.code, party_token=cached.token
                )
            # Deleted after its retention: a new offer.
            await self.ledger.forget(_reply_key(request_id))
        existing = await self.store.find_by_request_id(_request_key(request_id))
        if existing is not None and existing.expire_s > now:
            raise AlreadyExists(
                Reason.REQUEST_ID_REUSED,
                "an offer with this request_id exists but its code can no longer be shown;"
                " create a new offer with a new request_id",
            )
        return None

    async def _remember(self, request_id: str, reply: _Reply, ttl_s: float) -> None:
        """Keep what a retry needs, sealed (see _Reply), for the offer's lifetime."""
        await self.ledger.put(_reply_key(request_id), reply.seal(request_id), ttl_s)

    async def claim_offer(
        self,
        code: str,
        peer_ip: str | None,
        request_id: str = "",
        *,
        pake_message: bytes = b"",
        claim_verifier: bytes = b"",
        principal: Principal | None = None,
    ) -> broker_pb2.ClaimOfferResponse:
        """Redeem a nameplate; a second, expired or wrong claim all look like a wrong code.

        Unless it repeats the first claim's ``request_id``: then the claimant (which crashed
        before it saw the answer, say) gets the session and the same token again. A PAKE
        offer needs the receiver's ``pake_message`` (kept from the first claim); a
        store-and-forward offer the ``claim_verifier`` its sender gave, else it is not found.

        Limits (issue 10, findings 3 and 4; see ratelimit.ClaimLimiter): a source network
        out of failed claims is refused before the nameplate is looked up, so the refusal
        says nothing about it; what other sources did never refuses a claim. Every failure,
        an expired code included, is charged to its source. A found store-and-forward offer
        is given up after ``claim_guesses_per_offer`` wrong verifiers, and a live offer
        whose claimant never confirmed the key within ``claim_confirm_timeout_s`` is given
        up at the next claim: either way its sender sees it end, with the reason, and can
        offer again.
        """
        validation.check_key_field(pake_message, "pake_message")
        validation.check_key_field(claim_verifier, "claim_verifier")
        await self.accounts.check_anonymous(principal, "code claims")
        if not pake_message and not claim_verifier:
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "a claim needs the receiver's pake_message (or a store-and-forward claim_verifier)",
            )
        if codes.looks_like_a_whole_code(codes.normalize(code)):
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "send only the code's nameplate (such as 7-orbit), never its password",
            )
        now = self.clock()
        if not await self.limiter.allowed(peer_ip, now):
            raise ResourceExhausted(
                Reason.RATE_LIMITED,
                "too many failed code claims from this address; wait a little and try again",
            )
        # A claim that loses the session's compare-and-set to another call (another claim of
        # the same code, on this replica or another) looks again: the code is then claimed,
        # and this claim answers as any second claim does (NOT_FOUND), not ABORTED, which
        # would tell a guesser that the nameplate exists.
        for _ in range(_CLAIM_TRIES - 1):
            with contextlib.suppress(_Raced):
                return await self._claim_once(
                    code, peer_ip, request_id, pake_message, claim_verifier
                )
        try:
            return await self._claim_once(code, peer_ip, request_id, pake_message, claim_verifier)
        except _Raced:
            raise Aborted(Reason.CONFLICT, "the offer changed meanwhile; retry") from None

    async def _claim_once(
        self,
        code: str,
        peer_ip: str | None,
        request_id: str,
        pake_message: bytes,
        claim_verifier: bytes,
    ) -> broker_pb2.ClaimOfferResponse:
        now = self.clock()
        normalized = codes.normalize(code)
        record = None
        if codes.is_well_formed(normalized):
            record = await self.store.find_by_code_hash(codes.hash_code(self.token_key, normalized))
        if record is not None and record.claim_verifier is not None:
            if not hmac.compare_digest(claim_verifier, record.claim_verifier):
                await self._guessed_at(record, now)
                record = None  # a found nameplate alone does not claim a forwarded offer
        elif record is not None and not pake_message:
            record = None
        if record is not None and record.session.claimed and request_id:
            token = codes.derived_token(self.token_key, record.session_id, request_id)
            if (
                record.receiver_token_hash == codes.hash_token(token)
                and record.session.state not in states.FINAL_STATES
            ):
                return broker_pb2.ClaimOfferResponse(
                    session=view(record.session, Party.RECEIVER), party_token=token
                )
        if record is not None and record.session.claimed:
            await self._end_if_squatted(record, now)
        if (
            record is None
            or record.session.claimed
            or record.session.state != states.OFFERED
            or record.expire_s <= now  # expired answers as wrong, and is charged as wrong
        ):
            await self.limiter.failed(peer_ip, now)
            raise _not_found()
        token = (
            codes.derived_token(self.token_key, record.session_id, request_id)
            if request_id
            else codes.new_token()
        )
        record.receiver_token_hash = codes.hash_token(token)
        if record.claim_verifier is None:
            record.session.receiver.pake_message = pake_message
        record = await self._claim(record)
        await self._remember_claim(record, now)
        return broker_pb2.ClaimOfferResponse(
            session=view(record.session, Party.RECEIVER), party_token=token
        )

    async def _claim(self, record: SessionRecord) -> SessionRecord:
        """Fire CLAIM (a code's claim, a person's take): one winner; a loser of the
        compare-and-set raises _Raced, to look again."""
        try:
            return await self._fire(record, Event.CLAIM, Party.RECEIVER)
        except Aborted as exc:
            if exc.reason != Reason.CONFLICT:
                raise
            raise _Raced from None

    async def _remember_claim(self, record: SessionRecord, now: float) -> None:
        """Note when a live (PAKE) offer was claimed, for claim_confirm_timeout_s."""
        if record.claim_verifier is not None:
            return
        await self._claimed_at(record.session_id, now)

    async def _claimed_at(self, session_id: str, now: float) -> float:
        """When the live offer was claimed, or a person's offer taken by its current device
        (noted now if it was not), in the ledger: a replica that dies, or one that sees the
        next claim, still knows the first one."""
        ttl = self.config.offer_ttl_max_s + self.config.claim_confirm_timeout_s
        return await self.ledger.first(f"claimed:{session_id}", now, ttl)

    async def _claim_lapsed(self, session_id: str, now: float) -> bool:
        """Whether the offer's claimant (a person's: the device that took it) had
        claim_confirm_timeout_s to go on and did not (a claim the ledger forgot counts from
        now)."""
        claimed_at = await self._claimed_at(session_id, now)
        return now - claimed_at >= self.config.claim_confirm_timeout_s

    async def _guessed_at(self, record: SessionRecord, now: float) -> None:
        """A wrong verifier for a found store-and-forward offer: count it against the offer,
        and give the offer up once it had claim_guesses_per_offer of them, so that its
        guess count is bounded whatever its lifetime."""
        session = record.session
        if session.state != states.OFFERED or session.claimed or record.expire_s <= now:
            return  # a claimed offer is its receiver's: guessing must not take it away
        guesses = await self.limiter.offer_failed(record.session_id)
        if guesses >= self.config.claim_guesses_per_offer:
            why = f"the code was guessed at {guesses} times, so it no longer works"
            await self._give_up(record, f"{why}; make a new offer")

    async def _end_if_squatted(self, record: SessionRecord, now: float) -> None:
        """Give up a live offer whose claimant never proved the code in time.

        Someone claimed the nameplate (a stranger, or a receiver that died before its key
        confirmation) and did nothing for claim_confirm_timeout_s: another claim of the
        same nameplate then ends the offer, so that its sender learns it and can offer
        again, instead of waiting for the offer's whole lifetime. This claim still fails.
        """
        session = record.session
        if (
            record.claim_verifier is not None
            or session.state != states.OFFERED
            or session.receiver.key_confirmation
        ):
            return
        if await self._claim_lapsed(record.session_id, now):
            await self._give_up(
                record,
                "the code was claimed, but the claimant never proved it (someone else may"
                " have claimed it); make a new offer",
            )

    async def _give_up(self, record: SessionRecord, reason: str) -> None:
        """End an offer that guessing made unsafe: EXPIRED, with why, for its sender."""
        record.session.failure_reason = reason
        try:
            await self._fire(record, Event.EXPIRE, Party.BROKER)
        except (Aborted, states.LifecycleError):  # a call changed it meanwhile
            return
        await self.ledger.forget(f"claimed:{record.session_id}")
        log.info("offer given up", extra={"session": record.session.name, "why": reason})

    async def confirm_key(
        self, name: str, token: str | None, key_confirmation: bytes, certificate_mac: bytes
    ) -> broker_pb2.Session:
        """Record a party's key confirmation (and the sender's certificate MAC).

        The receiver confirms first, once it claimed; the sender after it (for a
        store-and-forward offer: any time, it has no PAKE to wait for). Each confirmation is
        set once; the same one again is a no-op, another one is refused.
        """
        validation.check_key_field(key_confirmation, "key_confirmation")
        validation.check_key_field(certificate_mac, "certificate_mac")
        if not key_confirmation:
            raise InvalidArgument(Reason.INVALID_ARGUMENT, "key_confirmation is empty")
        record, party = await self.authorize(name, token)
        session = record.session
        if session.state != states.OFFERED:
            raise FailedPrecondition(
                Reason.WRONG_STATE, "keys are confirmed before the offer is accepted"
            )
        mine = session.sender if party is Party.SENDER else session.receiver
        if mine.key_confirmation:
            if hmac.compare_digest(mine.key_confirmation, key_confirmation):
                return view(session, party)
            raise FailedPrecondition(
                Reason.KEY_ALREADY_CONFIRMED, f"the {party.value} confirmed its key already"
            )
        if party is Party.RECEIVER and not session.claimed:
            raise FailedPrecondition(Reason.WRONG_STATE, "the offer is not claimed")
        # A store-and-forward code's key and a person offer's are known to the sender at
        # once: nothing to wait for.
        forwarded = record.claim_verifier is not None or session.HasField("person")
        if party is Party.SENDER and not forwarded and not session.receiver.key_confirmation:
            raise FailedPrecondition(
                Reason.KEY_NOT_CONFIRMED, "the receiver has not confirmed the key yet"
            )
        mine.key_confirmation = key_confirmation
        if party is Party.SENDER:
            mine.certificate_mac = certificate_mac
        await self._commit(record, states.Outcome(session.state, session.claimed))
        return view(session, party)

    # -- authenticated calls ----------------------------------------------------------------

    async def authorize(self, name: str, token: str | None) -> tuple[SessionRecord, Party]:
        """The session `name` and the caller's party, from the caller's bearer token."""
        validation.check_name(name)
        if not token:
            raise Unauthenticated(
                Reason.TOKEN_MISSING,
                "missing 'authorization: Bearer <party_token>' metadata",
            )
        found = await self.store.session_by_token_hash(codes.hash_token(token))
        if found is None:  # a deleted session's tokens go with it
            raise Unauthenticated(Reason.TOKEN_INVALID, "the party token is invalid")
        record, party = found
        if name != record.session.name:
            raise PermissionDenied(
                Reason.WRONG_SESSION,
                "the party token does not grant access to this session",
            )
        person = record.session.person
        if record.session.HasField("person"):  # a revoked device can do nothing
            sender = party is Party.SENDER
            await self.accounts.check_device(
                person.sender_device.device_id if sender else person.receiver_device_id
            )
        return await self._expire_if_due(record), party

    async def accept(
        self, name: str, token: str | None, receiver: broker_pb2.PeerInfo, peer_ip: str | None
    ) -> broker_pb2.Session:
        """The receiver's consent: lease the sender's ports and fill in the plan."""
        record, party = await self.authorize(name, token)
        validation.check_peer(receiver, "receiver")
        session = record.session
        # Refused here, if at all, before any port is leased.
        outcome = states.apply(session.state, session.claimed, Event.ACCEPT, party)
        if not confirmed(session):
            raise FailedPrecondition(
                Reason.KEY_NOT_CONFIRMED, "the sender has not confirmed the code's key yet"
            )
        now = self.clock()
        expire_s = now + self.config.session_ttl_s
        _update_peer(session.receiver, receiver, peer_ip)
        session.expire_time.CopyFrom(timestamp(expire_s))
        return await self._negotiate(record, outcome, expire_s, now)  # attempt 0 -> 1

    async def resume(
        self, name: str, token: str | None, peer: broker_pb2.PeerInfo, peer_ip: str | None
    ) -> broker_pb2.Session:
        """A party comes back (restarted, or lost its data connection) with new details.

        Before acceptance only the caller's PeerInfo is replaced. Once accepted, the session
        also starts its next attempt: back to ACCEPTED, attempt + 1, the listener's lease
        replaced by a fresh one (in one store step, so it may reuse the freed ports) and a new
        plan with a new connect deadline. expire_time stays: it bounds every attempt.
        """
        record, party = await self.authorize(name, token)
        validation.check_peer(peer, party.value)
        session = record.session
        outcome = states.apply(session.state, session.claimed, Event.RESUME, party)
        _update_peer(session.sender if party is Party.SENDER else session.receiver, peer, peer_ip)
        if outcome.state == states.OFFERED:
            return view(await self._commit(record, outcome), party)
        return await self._negotiate(record, outcome, record.expire_s, self.clock())

    async def decline(self, name: str, token: str | None, reason: str) -> broker_pb2.Session:
        """The receiver's refusal."""
        validation.check_reason(reason)
        record, party = await self.authorize(name, token)
        record.session.failure_reason = reason
        return view((await self._fire(record, Event.DECLINE, party)).session, party)

    async def cancel(self, name: str, token: str | None, reason: str) -> broker_pb2.Session:
        """Either side ends an unfinished session."""
        validation.check_reason(reason)
        record, party = await self.authorize(name, token)
        record.session.failure_reason = reason
        return view((await self._fire(record, Event.CANCEL, party)).session, party)

    # -- offers to a person ----------------------------------------------------------------

    async def take_offer(self, name: str, principal: Principal) -> broker_pb2.TakeOfferResponse:
        """Make the calling device the receiver of an offer to its user: the first device
        wins (the claim's compare-and-set); the same device again gets the same token."""
        validation.check_name(name)
        for _ in range(_CLAIM_TRIES):
            record = await self.store.get_session(name.removeprefix("sessions/"))
            if record is None or record.session.person.recipient_user != principal.user:
                raise NotFound(Reason.OFFER_NOT_FOUND, "no offer to you has this name")
            record = await self._expire_if_due(record)
            try:
                return await self._take_once(record, principal)
            except _Raced:
                continue
        raise Aborted(Reason.CONFLICT, "the offer changed meanwhile; retry")

    async def _take_once(
        self, record: SessionRecord, principal: Principal
    ) -> broker_pb2.TakeOfferResponse:
        session, person = record.session, record.session.person
        device_id = principal.device_id
        token = codes.derived_token(self.token_key, record.session_id, f"device\0{device_id}")
        now = self.clock()
        retake = False
        if session.claimed:
            if person.receiver_device_id != device_id:
                # A device that took the offer and never accepted it (it died, its person
                # walked away) does not hold it for the offer's whole life: after
                # claim_confirm_timeout_s another of the person's devices may take it over.
                lapsed = await self._claim_lapsed(record.session_id, now)
                if session.state != states.OFFERED or not lapsed:
                    wait = f"{self.config.claim_confirm_timeout_s:g} s"
                    raise FailedPrecondition(
                        Reason.OFFER_TAKEN,
                        f"another of your devices ({person.receiver_device_id}) took this offer"
                        f" (if it does not accept it within {wait}, it can be taken here)",
                    )
                retake = True
            else:
                if session.state in states.FINAL_STATES:
                    raise _offer_over(session)
                return broker_pb2.TakeOfferResponse(
                    session=view(session, Party.RECEIVER), party_token=token
                )
        if session.state != states.OFFERED:
            raise _offer_over(session)
        if not confirmed(session):
            raise FailedPrecondition(
                Reason.KEY_NOT_CONFIRMED, "the sender has not confirmed the offer yet"
            )
        if not any(e.device_id == device_id for e in person.key_envelopes):
            raise FailedPrecondition(
                Reason.WRONG_STATE,
                "this device enrolled after the offer was made, so its key was not sealed to"
                " it; take the offer on another of your devices",
            )
        before = person.receiver_device_id
        record.receiver_token_hash = codes.hash_token(token)  # the earlier device's goes
        person.receiver_device_id = device_id
        if retake:
            try:
                await self._commit(record, states.Outcome(states.OFFERED, True))
            except Aborted:
                raise _Raced from None
            await self.accounts.audit(
                "offer.retaken",
                {
                    "session": session.name,
                    "recipient": person.recipient_user,
                    "receiver_device": device_id,
                    "from_device": before,
                },
            )
        else:
            record = await self._claim(record)
        await self.ledger.forget(f"claimed:{record.session_id}")  # this device's clock
        await self._claimed_at(record.session_id, now)
        return broker_pb2.TakeOfferResponse(
            session=view(record.session, Party.RECEIVER), party_token=token
        )

    async def inbox(self, principal: Principal) -> tuple[list[broker_pb2.Session], int]:
        """The offers waiting for the caller's user as its device sees them, oldest first,
        as many as fit in inbox_response_bytes (at least one), and how many more wait."""
        now = self.clock()
        records = await self.store.offers_to(principal.user, now, self.config.inbox_max_offers)
        waiting = [
            inbox_view(r.session) for r in records if not r.session.claimed and confirmed(r.session)
        ]
        shown: list[broker_pb2.Session] = []
        size = 0
        for session in waiting:
            size += session.ByteSize()
            if shown and size > INBOX_RESPONSE_BYTES:
                break
            shown.append(session)
        return shown, len(waiting) - len(shown)

    async def watch_inbox(
        self, principal: Principal, bearer: str | None, caller: str | None
    ) -> AsyncGenerator[broker_pb2.WatchInboxResponse, None]:
        """The caller's inbox now, then again after each change, with the offers that left
        it; the device is online meanwhile (its presence renewed every third of
        presence_ttl_s, when its device and token are checked again: a revoked device or an
        expired token ends the stream with UNAUTHENTICATED)."""
        # Counted per user, not per address: a signed-in device is known, and an office
        # behind one NAT has more than watches_per_address devices (each device: per_party).
        key = f"user:{principal.user}"
        stream_id = secrets.token_hex(8)
        renew_every = self.config.presence_ttl_s / 3
        async with self.hub.subscribe(inbox_key(principal.user), principal.device_id, key) as w:
            await self.accounts.mark_online(principal, stream_id)
            try:
                # Renewals at a random point of each period: streams that opened together
                # (after a restart, say) would otherwise renew together, a burst of writes.
                renew_at = self.clock() + renew_every * random.uniform(0.5, 1.0)
                sent: dict[str, bytes] = {}
                first = True
                while True:
                    offers, more = await self.inbox(principal)
                    now_shown = {o.name: o.SerializeToString(deterministic=True) for o in offers}
                    left = [name for name in sent if name not in now_shown]
                    gone = [await self._gone(name, principal) for name in left]
                    if first or gone or now_shown != sent:
                        yield broker_pb2.WatchInboxResponse(offers=offers, gone=gone, more=more)
                        first = False
                    sent = now_shown
                    timeout = max(renew_at - self.clock(), 0.0)
                    try:
                        if await asyncio.wait_for(w.next(), timeout) is None:
                            return  # the hub closed (shutdown)
                    except TimeoutError:
                        pass
                    if self.clock() >= renew_at:
                        principal = await self.accounts.principal(bearer)
                        await self.accounts.mark_online(principal, stream_id)
                        renew_at = self.clock() + renew_every * random.uniform(0.5, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await self.accounts.mark_offline(principal, stream_id)

    async def _gone(self, name: str, principal: Principal) -> broker_pb2.Session:
        """An offer that left the inbox, for the devices that saw it there: its state, who
        took it, why it ended; not its manifest again."""
        record = await self.store.get_session(name.removeprefix("sessions/"))
        if record is None:
            return broker_pb2.Session(name=name, state=states.EXPIRED)
        out = inbox_view(record.session)
        out.ClearField("manifest")
        return out

    async def get(self, name: str, token: str | None) -> broker_pb2.Session:
        """The session as it is now, as the caller may see it."""
        record, party = await self.authorize(name, token)
        return view(record.session, party)

    async def report(
        self,
        name: str,
        token: str | None,
        state: states.State,
        bytes_done: int,
        failure_reason: str,
        path: broker_pb2.PathReport | None = None,
    ) -> broker_pb2.Session:
        """Move a session through connecting/transferring/outcome and record bytes_done.

        The receiver's COMPLETED on a session already completed succeeds and changes nothing
        (no write, no new version, nothing published; bytes_done stays the completed one).
        """
        session, _ = await self.report_change(name, token, state, bytes_done, failure_reason, path)
        return session

    async def report_change(
        self,
        name: str,
        token: str | None,
        state: states.State,
        bytes_done: int,
        failure_reason: str,
        path: broker_pb2.PathReport | None = None,
        file_digests: Sequence[bytes] = (),
    ) -> tuple[broker_pb2.Session, bool]:
        """`report`, and whether this call wrote the session (False: the no-op on a final
        state). Of two reports racing to the same final state exactly one wrote it (the
        other lost the compare-and-set, or found it final), so whoever counts completions
        counts each once. ``file_digests`` (the receiver's completion) go to the audit log
        only."""
        validation.check_reason(failure_reason)
        validation.check_state(state)
        if path is not None:
            validation.check_path_report(path)
        if any(len(d) > validation.MAX_KEY_FIELD_BYTES for d in file_digests):
            raise InvalidArgument(Reason.INVALID_ARGUMENT, "a file digest is at most 64 bytes")
        if bytes_done < 0:
            raise InvalidArgument(Reason.INVALID_ARGUMENT, "bytes_done must not be negative")
        record, party = await self.authorize(name, token)
        session = record.session
        outcome = states.report(session.state, session.claimed, state, party)
        if session.state in states.FINAL_STATES:  # a final state accepts only the no-op
            return session, False
        session.bytes_done = bytes_done
        if path is not None and party is Party.RECEIVER:
            session.path.CopyFrom(path)
        if outcome.state == states.FAILED:
            session.failure_reason = failure_reason
        extra: dict[str, object] = {}
        files = session.manifest.files
        if outcome.state == states.COMPLETED and party is Party.RECEIVER and file_digests:
            if len(file_digests) != len(files):
                raise InvalidArgument(
                    Reason.INVALID_ARGUMENT, "file_digests needs one digest per file, or none"
                )
            extra = {"algorithm": "blake3-chunks", "digests": [d.hex() for d in file_digests]}
        return await self._commit(record, outcome, extra), True

    async def publish_candidates(
        self,
        name: str,
        token: str | None,
        attempt: int,
        candidates: Sequence[broker_pb2.Candidate],
    ) -> broker_pb2.Session:
        """Put the caller's candidates for ``attempt`` in the plan, for the other party.

        Only while the session has a plan (accepted, connecting, transferring) and only for
        its current attempt: candidates of an attempt that is over would send the other party
        to ports nobody listens on any more (ATTEMPT_MOVED). The state does not change.
        """
        record, party = await self.authorize(name, token)
        validation.check_candidates(candidates, party.value, ported=True)
        session = record.session
        if session.state not in _CONNECTABLE or not session.HasField("plan"):
            state = broker_pb2.Session.State.Name(session.state)
            raise FailedPrecondition(
                Reason.WRONG_STATE, f"candidates are published once accepted, not in {state}"
            )
        if attempt != session.attempt:
            raise FailedPrecondition(
                Reason.ATTEMPT_MOVED,
                f"attempt {attempt} is over: the session is on attempt {session.attempt}",
            )
        plan = session.plan
        mine = plan.sender_candidates if party is Party.SENDER else plan.receiver_candidates
        del mine[:]
        mine.extend(candidates)
        session.update_time.CopyFrom(timestamp(self.clock()))
        try:
            stored = await self.store.update_session(record)
        except StaleRecord:
            raise Aborted(Reason.CONFLICT, "the session changed meanwhile; retry") from None
        record.version = stored.version
        self.hub.publish(record.session_id, record.version, session)
        return view(session, party)

    async def watch(
        self, name: str, token: str | None, caller: str | None = None
    ) -> AsyncGenerator[broker_pb2.Session, None]:
        """The session now, then its latest state after each change, until a final state or
        the hub closes. A watcher that reads slowly skips states, never the last one.

        ``caller`` is the caller's IP address; the hub bounds watches per party of the
        session, per caller and in total (ResourceExhausted, TOO_MANY_WATCHES).
        """
        record, party = await self.authorize(name, token)
        key = self.limiter.source(caller)
        weight = record.session.ByteSize()
        async with self.hub.subscribe(record.session_id, party.value, key, weight) as watcher:
            record = await self._reload(record)
            sent = record.version
            yield view(record.session, party)
            if record.session.state in states.FINAL_STATES:
                return
            while True:
                item = await watcher.next()
                if item is None:
                    return
                version, session = item
                if version <= sent:
                    continue
                sent = version
                yield view(session, party)
                if session.state in states.FINAL_STATES:
                    return

    # -- expiry -----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Expire every live session past its expire_time, delete the sessions that ended
        more than session_retention_s ago; return how many expired."""
        now = self.clock()
        await self._delete_ended(now)  # first: on a full disk, it frees what the rest may need
        if now - self._audit_trimmed >= _AUDIT_TRIM_EVERY_S:
            self._audit_trimmed = now
            await self.accounts.trim_audit()
        return await self._expire_due(now)

    async def _delete_ended(self, now: float) -> int:
        """Delete the sessions whose retention ran out, in batches; return how many."""
        deleted = 0
        while True:
            batch = await self.store.delete_ended(
                now - self.config.session_retention_s, _SWEEP_BATCH
            )
            deleted += batch
            if batch < _SWEEP_BATCH:
                if deleted:
                    log.info("ended sessions deleted", extra={"count": deleted})
                return deleted

    async def _expire_due(self, now: float) -> int:
        expired = 0
        while True:
            due = await self.store.due_for_expiry(now, _SWEEP_BATCH)
            for record in due:
                try:
                    await self._fire(record, Event.EXPIRE, Party.BROKER)
                    expired += 1
                except (Aborted, states.LifecycleError):  # a call changed it meanwhile
                    log.debug("session changed while expiring", extra={"id": record.session_id})
            if len(due) < _SWEEP_BATCH:
                return expired

    async def run_sweeper(self) -> None:
        """Sweep every sweep_interval_s until cancelled; errors are logged, not fatal."""
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await self.sweep()
            except StorageFull:
                log.warning("expiry sweep deferred: the data dir is full")
            except Exception:
                log.exception("expiry sweep failed")

    # -- helpers ----------------------------------------------------------------------------

    async def _negotiate(
        self, record: SessionRecord, outcome: states.Outcome, expire_s: float, now: float
    ) -> broker_pb2.Session:
        """Start the next connection attempt and write `outcome`: the accept and resume step.

        Leases the listener's ports until `expire_s` (replacing any lease the session held),
        sets a new plan and bumps ``attempt`` (0 before acceptance, so acceptance starts
        attempt 1), then commits. The outcome was checked before this is called, so an illegal
        event never leases. If anything fails after the lease (a concurrent write: Aborted),
        the session's lease is made to match its stored plan again before the error goes on.
        """
        span = await self._lease_listener(record, expire_s, now)
        try:
            record.session.plan.CopyFrom(self._plan(span, expire_s, now))
            record.session.attempt += 1
            return await self._commit(record, outcome)
        except BaseException:
            await self._reconcile_lease(record.session_id, now)
            raise

    async def _lease_listener(
        self, record: SessionRecord, expire_s: float, now: float
    ) -> leases.Span:
        """Lease the listener (the sender) stream_count + 2 ports, replacing any older lease.

        The lease is held until the plan's connect deadline, and after it only while a peer
        has reported CONNECTING or TRANSFERRING (issue 10, finding 5): a session nobody
        connects for gives its ports back by itself, and a resume leases again. It is owned
        by the receiver's address (its source network), whose consent made it: one owner
        holds at most leases_per_caller live leases on one listener host, so a flood of
        self-accepted offers cannot take the range from the other senders behind an address.
        """
        sender = record.session.sender
        allowed = (sender.allowed_ports.first_port, sender.allowed_ports.last_port)
        count = self.config.stream_count + 2
        try:
            return await self.store.lease_ports(
                _host_key(sender),
                allowed,
                count,
                record.session_id,
                expire_s,
                now,
                owner=self._lease_owner(record.session),
                hold_until=now + self.config.connect_timeout_s,
                max_per_owner=self.config.leases_per_caller,
            )
        except leases.TooManyLeases as exc:
            raise ResourceExhausted(Reason.TOO_MANY_LEASES, str(exc)) from None
        except leases.NoPortsAvailable as exc:
            raise ResourceExhausted(Reason.NO_PORTS, str(exc)) from None

    def _lease_owner(self, session: broker_pb2.Session) -> str:
        """Whom a session's lease counts against: the receiver's source network."""
        return self.limiter.source(reflexive_ip(session.receiver))

    def _plan(self, span: leases.Span, expire_s: float, now: float) -> broker_pb2.ConnectionPlan:
        """A plan for a new attempt: the sender listens on `span` until `expire_s`."""
        return broker_pb2.ConnectionPlan(
            listener=broker_pb2.ConnectionPlan.ROLE_SENDER,
            listener_ports=broker_pb2.PortRange(first_port=span[0], last_port=span[1]),
            stream_count=self.config.stream_count,
            connect_deadline=timestamp(now + self.config.connect_timeout_s),
            lease_expire_time=timestamp(expire_s),
        )

    async def _reconcile_lease(self, session_id: str, now: float) -> None:
        """After a failed write, make the session's lease match its stored plan again.

        A session that is not live or has no plan holds no lease; a live one holds exactly
        the ports of its stored plan (released instead if they cannot be had back).
        """
        stored = await self.store.get_session(session_id)
        if (
            stored is None
            or stored.session.state not in states.LIVE_STATES
            or not stored.session.HasField("plan")
        ):
            await self.store.release_lease(session_id)
            return
        ports = stored.session.plan.listener_ports
        span = (ports.first_port, ports.last_port)
        try:
            await self.store.lease_ports(
                _host_key(stored.session.sender),
                span,
                span[1] - span[0] + 1,
                session_id,
                stored.expire_s,
                now,
                owner=self._lease_owner(stored.session),
                hold_until=stored.session.plan.connect_deadline.ToNanoseconds() / 1e9,
            )
        except (leases.NoPortsAvailable, ValueError):
            await self.store.release_lease(session_id)

    async def _reload(self, record: SessionRecord) -> SessionRecord:
        fresh = await self.store.get_session(record.session_id)
        return record if fresh is None else await self._expire_if_due(fresh)

    async def _expire_if_due(self, record: SessionRecord) -> SessionRecord:
        if record.session.state not in states.LIVE_STATES or record.expire_s > self.clock():
            return record
        try:
            return await self._fire(record, Event.EXPIRE, Party.BROKER)
        except Aborted:
            # Another writer got there first (the sweeper, a call interleaved with this one,
            # another replica): what it stored is the session now, if that is no longer due.
            fresh = await self.store.get_session(record.session_id)
            if fresh is None or (
                fresh.session.state in states.LIVE_STATES and fresh.expire_s <= self.clock()
            ):
                raise
            return fresh

    async def _fire(self, record: SessionRecord, event: Event, party: Party) -> SessionRecord:
        session = record.session
        outcome = states.apply(session.state, session.claimed, event, party)
        await self._commit(record, outcome)
        return record

    async def _commit(
        self,
        record: SessionRecord,
        outcome: states.Outcome,
        audit_extra: dict[str, object] | None = None,
    ) -> broker_pb2.Session:
        """Write the outcome, free the lease of a final session, tell the watchers (and, for
        an offer to a person, the recipient's inbox streams), note it in the audit log (with
        ``audit_extra``)."""
        session = record.session
        before = (session.state, session.claimed)
        session.state = outcome.state
        session.claimed = outcome.claimed
        session.update_time.CopyFrom(timestamp(self.clock()))
        final = outcome.state in states.FINAL_STATES
        if final and outcome.state != states.EXPIRED:
            # Until then the code still finds the session: single use is `claimed`, and a
            # repeated claim (same request_id) must find it. EXPIRED keeps it for CODE_EXPIRED.
            record.code_hash = None
        try:
            stored = await self.store.update_session(record)
        except StaleRecord:
            raise Aborted(Reason.CONFLICT, "the session changed meanwhile; retry") from None
        record.version = stored.version
        # Published before anything else is awaited, so that this process's watchers get the
        # versions it commits in order.
        self.hub.publish(record.session_id, record.version, session)
        if session.HasField("person") and before[0] == states.OFFERED:
            # the offer enters the inbox (its sender confirmed) or leaves it (taken, ended)
            self.hub.publish(inbox_key(session.person.recipient_user), record.version, session)
        if final:
            await self.store.release_lease(record.session_id)
        if before[0] != session.state or before[1] != session.claimed:
            await self._audit_change(session, before[0], audit_extra or {})
        return session

    async def _audit_change(
        self, session: broker_pb2.Session, before: states.State, extra: dict[str, object]
    ) -> None:
        """The audit log's entry for a session that changed state (or was claimed)."""
        if session.state == before:
            event = "offer.taken" if session.HasField("person") else "offer.claimed"
        else:
            event = (
                "session."
                + broker_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower()
            )
        fields: dict[str, object] = {"session": session.name, "from": states.state_name(before)}
        if session.HasField("person"):
            fields |= {
                "sender": session.person.sender_user,
                "recipient": session.person.recipient_user,
                "receiver_device": session.person.receiver_device_id or None,
            }
        if session.failure_reason:
            fields["reason"] = session.failure_reason
        if session.state == states.COMPLETED:
            fields["bytes"] = sum(entry.size_bytes for entry in session.manifest.files)
            fields["route"] = session.path.route or None
        fields |= extra
        await self.accounts.audit(event, fields, people=session.HasField("person"))


def _offer_over(session: broker_pb2.Session) -> FailedPrecondition:
    state = states.state_name(session.state)
    why = f": {session.failure_reason}" if session.failure_reason else ""
    return FailedPrecondition(Reason.WRONG_STATE, f"the offer is {state}{why}")


class _Raced(Exception):
    """A claim lost the session's compare-and-set: look again."""


@dataclasses.dataclass(slots=True)
class _Pending:
    """The CreateOffers of one request id running in this process: one at a time."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Reply:
    """What a retried CreateOffer (same request_id) needs to answer as the first call did.

    It holds the nameplate and the sender's token, which the store otherwise keeps only as
    hashes; so the ledger (on Redis: shared, so that a retry reaching another replica is
    answered too) keeps it sealed under a key derived from the request id, and finds it by
    another hash of that id. The store never sees the id itself either (_request_key): reading
    a reply takes the id, which only the sender knows (the client makes it random: 122 bits).
    Never the response itself: the session (its manifest) is read back from the store, so an
    entry is a few hundred bytes, not the manifest's size.
    """

    fingerprint: str
    session_id: str
    code: str
    token: str
    expire_s: float

    def seal(self, request_id: str) -> bytes:
        plain = json.dumps(dataclasses.astuple(self)).encode()
        return bytes(SecretBox(_digest(request_id, b"ferry-reply-key")).encrypt(plain))

    @classmethod
    def unseal(cls, request_id: str, sealed: bytes | None) -> _Reply | None:
        """The reply sealed under `request_id`; None if none is, or it does not open."""
        if sealed is None:
            return None
        try:
            fields = json.loads(SecretBox(_digest(request_id, b"ferry-reply-key")).decrypt(sealed))
            return cls(*fields)
        except (CryptoError, ValueError, TypeError):
            return None


def _digest(request_id: str, person: bytes) -> bytes:
    return hashlib.blake2b(request_id.encode(), digest_size=32, person=person).digest()


def _reply_key(request_id: str) -> str:
    """Where the ledger keeps the sealed reply to `request_id`."""
    return "reply:" + _digest(request_id, b"ferry-reply-id").hex()


def _request_key(request_id: str) -> str:
    """What the store indexes an offer's request id by (never the id: it opens the reply)."""
    return _digest(request_id, b"ferry-request").hex()


def _update_peer(stored: broker_pb2.PeerInfo, peer: broker_pb2.PeerInfo, ip: str | None) -> None:
    """Replace a party's connection details with ``peer``'s (and the address the broker
    observed), keeping what is set once and never by a later call: its PAKE message and
    key confirmation (ClaimOffer, ConfirmKey)."""
    kept = (stored.pake_message, stored.key_confirmation)
    stored.CopyFrom(_with_reflexive(peer, ip))
    stored.pake_message, stored.key_confirmation = kept


def _with_reflexive(peer: broker_pb2.PeerInfo, ip: str | None) -> broker_pb2.PeerInfo:
    """A copy of `peer` whose candidates end with the address the broker observed."""
    out = broker_pb2.PeerInfo()
    out.CopyFrom(peer)
    reflexive = broker_pb2.Candidate.KIND_SERVER_REFLEXIVE
    kept = [c for c in out.candidates if c.kind != reflexive]
    del out.candidates[:]
    out.candidates.extend(kept)
    if ip is not None:
        out.candidates.append(broker_pb2.Candidate(ip=ip, kind=reflexive))
    return out


def reflexive_ip(peer: broker_pb2.PeerInfo) -> str | None:
    """The address the broker observed a party at (its server-reflexive candidate), if any."""
    for candidate in peer.candidates:
        if candidate.kind == broker_pb2.Candidate.KIND_SERVER_REFLEXIVE:
            return candidate.ip
    return None


def _host_key(sender: broker_pb2.PeerInfo) -> str:
    """The lease namespace of the listener: its host_id, else its observed address."""
    if sender.host_id:
        return f"id:{sender.host_id}"
    for candidate in sender.candidates:
        if candidate.kind == broker_pb2.Candidate.KIND_SERVER_REFLEXIVE:
            return f"ip:{candidate.ip}"
    return "unknown"
