"""People on the broker: enrollment, sign-in, who is online, whom one may send to, the
operator's policy and the audit log (issue 13). gRPC-free, like core.py, which calls it for
offers to a person.

Who is who: the operator makes users (`ferry admin users add`, in an organisation) and
one-time enrollment tokens; a device enrolls with one (`enroll`), proving that it holds the
signing key it registers, and signs in with a signature over a stateless challenge
(`sign_in`, access.py) for a short-lived access token. Every call that takes an access token
reads the device again (`principal`): a revoked device is refused at its next call.

Whom one may send to: the users of one's own organisation (`peers`). What a person offer
must carry is checked in `check_person_offer`: one key envelope per enrolled device of the
recipient, and the sender device's signature over the offer, which the broker checks although
it does not need to trust it (the recipient's device checks it again): a broker that refuses
unsigned offers records only offers that a device really made in the audit log.

Policy: per-user offers per hour (a token bucket in the ledger, shared by replicas) and bytes
in the object store (fallback.py asks `store_bytes_of`), the largest offer, whether codes may
be used without an account, how many offers may wait in one inbox. The audit log (`audit`)
records metadata only — who offered which names and sizes to whom, when, and how it ended —
never a token, key, code, URL or file byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ferry.broker import access, validation
from ferry.broker.config import BrokerConfig
from ferry.broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unauthenticated,
)
from ferry.broker.people import DeviceRecord, Directory
from ferry.broker.ratelimit import ClaimLimiter
from ferry.broker.store import Store
from ferry.protocol import identity
from ferry.v1 import broker_pb2

log = logging.getLogger(__name__)

Clock = Callable[[], float]

MAX_USER_CHARS = 64
MAX_DEVICE_NAME_CHARS = 64
MAX_DEVICE_ID_CHARS = 64
MAX_ENROLLMENT_TOKEN_CHARS = 256
#: Files of a manifest the audit log lists by name (the count and total are always there).
AUDIT_FILES = 1000
#: Clock skew allowed between a sender's not_after and the broker's idea of the offer's TTL.
_NOT_AFTER_SLACK_S = 300.0


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in device, as an access token and the directory say."""

    user: str
    organization: str
    device: DeviceRecord
    token_expire_s: float

    @property
    def device_id(self) -> str:
        return self.device.device_id


def device_proto(device: DeviceRecord, online: bool = False) -> broker_pb2.Device:
    """The Device message for a record (public keys only: the broker has nothing else)."""
    return broker_pb2.Device(
        device_id=device.device_id,
        user=device.user,
        display_name=device.display_name,
        signing_key=device.signing_key,
        encryption_key=device.encryption_key,
        online=online,
        create_time=_timestamp(device.create_s),
    )


def manifest_summary(manifest: broker_pb2.Manifest) -> dict[str, Any]:
    """What the audit log keeps of a manifest: names and sizes (the first AUDIT_FILES),
    the file count and the total."""
    files = [
        {"path": entry.path, "size": entry.size_bytes} for entry in manifest.files[:AUDIT_FILES]
    ]
    return {
        "files": files,
        "file_count": len(manifest.files),
        "total_bytes": sum(entry.size_bytes for entry in manifest.files),
    }


class Accounts:
    """Users, devices, sign-in, presence and policy, over the store's Directory."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        token_key: bytes,
        limiter: ClaimLimiter,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.directory: Directory = store.directory()
        self.keys = access.Keys(token_key)
        self.ledger = store.ledger()
        self.limiter = limiter
        self.clock = clock

    # -- enrollment and sign-in -------------------------------------------------------------

    async def enroll(
        self, request: broker_pb2.EnrollDeviceRequest, peer_ip: str | None
    ) -> broker_pb2.EnrollDeviceResponse:
        """Make a device of the user an enrollment token was issued for (the token is used
        up). A wrong token counts as a failed claim of the caller's address."""
        validation.check_length(
            request.enrollment_token, MAX_ENROLLMENT_TOKEN_CHARS, "enrollment_token"
        )
        validation.check_length(request.display_name, MAX_DEVICE_NAME_CHARS, "display_name")
        _check_public_key(request.signing_key, "signing_key")
        _check_public_key(request.encryption_key, "encryption_key")
        now = self.clock()
        if not await self.limiter.allowed(peer_ip, now):
            raise ResourceExhausted(
                Reason.RATE_LIMITED,
                "too many failed enrollments or claims from this address; wait and try again",
            )
        proof = identity.enroll_bytes(
            request.signing_key, request.encryption_key, request.display_name
        )
        if not identity.verify(request.signing_key, request.key_signature, proof):
            raise InvalidArgument(
                Reason.SIGNATURE_INVALID,
                "key_signature is not the signing key's signature of the keys and name",
            )
        user_name = await self.directory.take_enrollment(_token_hash(request.enrollment_token), now)
        user = None if user_name is None else await self.directory.get_user(user_name)
        if user is None:
            await self.limiter.failed(peer_ip, now)
            raise Unauthenticated(
                Reason.ENROLLMENT_INVALID,
                "the enrollment token is unknown, used or expired; ask the operator for a new one",
            )
        device = DeviceRecord(
            device_id=secrets.token_hex(8),
            user=user.name,
            display_name=request.display_name or "device",
            signing_key=request.signing_key,
            encryption_key=request.encryption_key,
            create_s=now,
        )
        await self.directory.add_device(device)
        await self.audit(
            "device.enrolled",
            {
                "user": user.name,
                "device": device.device_id,
                "device_name": device.display_name,
                "fingerprint": identity.fingerprint(device.signing_key, device.encryption_key),
                "source": peer_ip,
            },
        )
        log.info("device enrolled", extra={"user": user.name, "device": device.device_id})
        return broker_pb2.EnrollDeviceResponse(
            device=device_proto(device), organization=user.organization
        )

    def challenge(self, device_id: str) -> broker_pb2.CreateChallengeResponse:
        """A fresh sign-in challenge: nothing is stored for it (access.Keys.challenge)."""
        _check_device_id(device_id)
        expire_s = self.clock() + self.config.challenge_ttl_s
        return broker_pb2.CreateChallengeResponse(
            challenge=self.keys.challenge(device_id, expire_s), expire_time=_timestamp(expire_s)
        )

    async def sign_in(
        self, request: broker_pb2.SignInRequest, broker_id: str, peer_ip: str | None
    ) -> broker_pb2.SignInResponse:
        """An access token for a device that signed a fresh challenge of this broker's."""
        _check_device_id(request.device_id)
        validation.check_length(request.challenge, 128, "challenge")
        validation.check_length(request.signature, identity.SIGNATURE_BYTES, "signature")
        now = self.clock()
        self.keys.check_challenge(request.device_id, request.challenge, now)
        device = await self._live_device(request.device_id)
        signed = identity.sign_in_bytes(broker_id, request.device_id, request.challenge)
        if not identity.verify(device.signing_key, request.signature, signed):
            await self.limiter.failed(peer_ip, now)
            raise Unauthenticated(
                Reason.SIGNATURE_INVALID, "the signature does not check with the device's key"
            )
        ttl = self.config.challenge_ttl_s + 1
        if await self.ledger.count(access.challenge_key(request.challenge), ttl) != 1:
            raise Unauthenticated(
                Reason.CHALLENGE_INVALID, "this challenge was used already; ask for a new one"
            )
        user = await self.directory.get_user(device.user)
        if user is None:  # removed meanwhile (remove_user revokes, but not in the same step)
            raise _revoked()
        expire_s = now + self.config.access_token_ttl_s
        token = self.keys.issue(
            access.AccessToken(user.name, device.device_id, user.organization, expire_s)
        )
        await self.audit(
            "device.signed_in", {"user": user.name, "device": device.device_id, "source": peer_ip}
        )
        return broker_pb2.SignInResponse(
            access_token=token,
            expire_time=_timestamp(expire_s),
            device=device_proto(device),
            organization=user.organization,
        )

    async def principal(self, bearer: str | None) -> Principal:
        """The signed-in device a bearer access token stands for, read again from the
        directory: Unauthenticated if the token is missing, invalid or expired, or the
        device was revoked (DEVICE_REVOKED)."""
        token = self.keys.read(bearer, self.clock())
        device = await self._live_device(token.device_id)
        if device.user != token.user:
            raise _revoked()
        return Principal(token.user, token.organization, device, token.expire_s)

    async def maybe_principal(self, bearer: str | None) -> Principal | None:
        """`principal` if the bearer token is an access token, else None (no token, or a
        party token: the calls that take either treat those as anonymous)."""
        if not access.looks_like_access_token(bearer):
            return None
        return await self.principal(bearer)

    async def check_anonymous(self, principal: Principal | None, what: str) -> None:
        """Refuse an anonymous call when the operator allows codes to signed-in devices only."""
        if principal is None and self.config.anonymous == "off":
            raise PermissionDenied(
                Reason.ANONYMOUS_DISABLED,
                f"this broker takes no {what} without an account: sign in (ferry login)",
            )

    async def _live_device(self, device_id: str) -> DeviceRecord:
        device = await self.directory.get_device(device_id)
        if device is None or device.revoked_s is not None:
            raise _revoked()
        return device

    async def check_device(self, device_id: str) -> None:
        """Unauthenticated (DEVICE_REVOKED) unless the device is enrolled and not revoked:
        the session calls of an offer to a person check the party's device with it."""
        await self._live_device(device_id)

    # -- peers ------------------------------------------------------------------------------

    async def peers(self, principal: Principal, only: str = "") -> broker_pb2.ListPeersResponse:
        """The users of the caller's organisation (or only the user ``only``, if it is one),
        with their devices and who is online."""
        if only:
            validation.check_length(only, MAX_USER_CHARS, "user")
            user = await self.directory.get_user(only)
            if user is None or user.organization != principal.organization:
                return broker_pb2.ListPeersResponse()
            users, devices = [user], await self.directory.devices_of(user.name)
        else:
            users = await self.directory.list_users(principal.organization)
            devices = await self.directory.devices_in(principal.organization)
        online = await self.directory.online([d.device_id for d in devices], self.clock())
        by_user: dict[str, list[broker_pb2.Device]] = {u.name: [] for u in users}
        for device in devices:
            if device.user in by_user:
                by_user[device.user].append(device_proto(device, device.device_id in online))
        return broker_pb2.ListPeersResponse(
            peers=[broker_pb2.Peer(user=name, devices=found) for name, found in by_user.items()]
        )

    async def mark_online(self, principal: Principal, stream_id: str) -> None:
        """The device holds an inbox stream: online until presence_ttl_s from now."""
        until = self.clock() + self.config.presence_ttl_s
        await self.directory.set_online(principal.device_id, stream_id, until)

    async def mark_offline(self, principal: Principal, stream_id: str) -> None:
        await self.directory.set_offline(principal.device_id, stream_id)

    # -- offers to a person -----------------------------------------------------------------

    async def check_person_offer(
        self, principal: Principal, request: broker_pb2.CreateOfferRequest, now: float
    ) -> None:
        """Refuse an offer to a person unless it is addressed within the sender's
        organisation, seals the key to exactly the recipient's devices, is signed by the
        calling device, and the recipient's inbox has room."""
        validation.check_length(request.recipient, MAX_USER_CHARS, "recipient")
        if request.sender.pake_message or request.claim_verifier:
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "an offer to a person has no code: no pake_message, no claim_verifier",
            )
        recipient = await self.directory.get_user(request.recipient)
        if recipient is None or recipient.organization != principal.organization:
            raise NotFound(
                Reason.USER_NOT_FOUND,
                f"there is no user {request.recipient!r} in your organisation",
            )
        devices = await self.directory.devices_of(recipient.name)
        if not devices:
            raise FailedPrecondition(
                Reason.USER_NOT_FOUND,
                f"{recipient.name} has no device yet: nobody could open the offer",
            )
        _check_envelopes(request.key_envelopes, devices, recipient.name)
        if not request.HasField("not_after"):
            raise InvalidArgument(Reason.INVALID_ARGUMENT, "an offer to a person needs not_after")
        not_after = request.not_after.seconds
        if not now < not_after <= now + self.config.offer_ttl_max_s + _NOT_AFTER_SLACK_S:
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "not_after must be in the future and within the broker's longest offer TTL",
            )
        signed = identity.offer_bytes(
            principal.user,
            principal.device_id,
            recipient.name,
            request.manifest,
            not_after,
            request.key_envelopes,
        )
        if not identity.verify(principal.device.signing_key, request.offer_signature, signed):
            raise InvalidArgument(
                Reason.SIGNATURE_INVALID,
                "offer_signature is not this device's signature of the offer",
            )
        waiting = await self.store.count_offers_to(recipient.name, now)
        if waiting >= self.config.inbox_max_offers:
            raise ResourceExhausted(
                Reason.INBOX_FULL,
                f"{recipient.name} has {waiting} offers waiting, the most this broker"
                " keeps; try again once some are taken",
            )

    async def take_offer_allowance(self, principal: Principal, now: float) -> None:
        """Spend one of the user's offers of this hour (RESOURCE_EXHAUSTED,
        OFFER_QUOTA_EXCEEDED, when none is left)."""
        user = await self.directory.get_user(principal.user)
        per_hour = self.config.user_offers_per_hour
        if user is not None and user.offers_per_hour is not None:
            per_hour = user.offers_per_hour
        # One bucket per quota value: a quota the operator changes applies at once.
        bucket = f"user-offer:{principal.user}:{per_hour}"
        if not await self.ledger.take(bucket, per_hour, per_hour / 3600, now):
            raise ResourceExhausted(
                Reason.OFFER_QUOTA_EXCEEDED,
                f"{principal.user} may make {per_hour} offers an hour on this broker and made"
                " them; wait a few minutes and try again",
            )

    async def store_bytes_of(self, user_name: str) -> int:
        """Bytes the object store may hold for the user's offers."""
        user = await self.directory.get_user(user_name)
        if user is not None and user.store_bytes is not None:
            return user.store_bytes
        return self.config.user_store_bytes

    # -- audit ------------------------------------------------------------------------------

    async def audit(self, event: str, fields: Mapping[str, Any], *, people: bool = True) -> None:
        """Record ``event`` in the audit log, as the operator's `audit` setting says (a code
        offer's events are not `people`). A failure to write is logged, never raised: the
        change it records is made already."""
        if self.config.audit == "off" or (self.config.audit == "people" and not people):
            return
        try:
            await self.directory.audit(event, self.clock(), fields)
        except Exception:
            log.exception("could not write the audit log", extra={"event": event})

    async def trim_audit(self) -> int:
        """Drop audit entries past audit_retention_s (the sweeper calls it)."""
        return await self.directory.trim_audit(self.clock() - self.config.audit_retention_s)


def _check_public_key(value: bytes, what: str) -> None:
    if len(value) != identity.PUBLIC_KEY_BYTES:
        raise InvalidArgument(Reason.INVALID_ARGUMENT, f"{what} must be 32 bytes")


def _check_device_id(device_id: str) -> None:
    if not device_id:
        raise InvalidArgument(Reason.INVALID_ARGUMENT, "device_id is empty")
    validation.check_length(device_id, MAX_DEVICE_ID_CHARS, "device_id")


def _check_envelopes(
    envelopes: Sequence[broker_pb2.KeyEnvelope], devices: Sequence[DeviceRecord], user: str
) -> None:
    """Exactly one envelope of the right size per enrolled device of the recipient."""
    wanted = {d.device_id for d in devices}
    given = [e.device_id for e in envelopes]
    if len(given) != len(set(given)) or set(given) != wanted:
        raise InvalidArgument(
            Reason.INVALID_ARGUMENT,
            f"key_envelopes must hold one envelope for each of {user}'s {len(wanted)} devices"
            " (their devices changed? list peers again)",
        )
    if any(len(e.sealed_key) != identity.SEALED_KEY_BYTES for e in envelopes):
        raise InvalidArgument(
            Reason.INVALID_ARGUMENT, f"a sealed key is {identity.SEALED_KEY_BYTES} bytes"
        )


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _revoked() -> Unauthenticated:
    return Unauthenticated(
        Reason.DEVICE_REVOKED,
        "this device is not enrolled here, or the operator revoked it; enroll it again"
        " (ferry login with a new token)",
    )
