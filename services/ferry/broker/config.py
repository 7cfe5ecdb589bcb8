"""BrokerConfig: every knob of the broker, with safe defaults for a laptop.

It also owns the rule that keeps the default safe: gRPC without TLS only on loopback. A
broker whose ``listen`` is not a loopback address needs ``tls_cert`` and ``tls_key``, or
``insecure_plaintext`` said out loud (the party tokens and codes would cross the network in
clear).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path

#: The URL schemes of store_url: a Redis server over TCP, TLS or a Unix socket.
STORE_SCHEMES = ("redis", "rediss", "unix")


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    """How one broker process runs. All durations are in seconds."""

    #: host:port to listen on; port 0 picks a free port (the bound one is reported).
    listen: str = "127.0.0.1:50051"
    #: Directory of the SQLite database (`broker.sqlite3`) and of the token key; created if
    #: missing.
    data_dir: Path = Path("ferry-data")
    #: Where sessions, leases and uploads live: None (or "sqlite") for the SQLite database in
    #: data_dir, or the URL of a Redis that broker replicas share: redis://, rediss:// (TLS)
    #: or unix://. It may carry a password, so it is left out of the repr.
    store_url: str | None = dataclasses.field(default=None, repr=False)
    #: Offer lifetime when the request gives none.
    offer_ttl_default_s: float = 600.0
    #: Shortest offer lifetime a request may ask for (shorter asks are raised to it).
    offer_ttl_min_s: float = 10.0
    #: Longest offer lifetime a request may ask for (longer asks are lowered to it).
    offer_ttl_max_s: float = 24 * 3600.0
    #: Lifetime of a session (and of its port lease) from acceptance on.
    session_ttl_s: float = 24 * 3600.0
    #: Parallel data streams per session; the listener leases stream_count + 2 ports.
    #: 2 by measurement (bench/transfer.py, 1 GiB on tmpfs, two cores): 1 or 2 streams reach
    #: 0.77-0.80 of a bare TLS copy, 4 streams 0.68; two keep a spare if one stream dies.
    stream_count: int = 2
    #: Time from acceptance until the direct connection must be up.
    connect_timeout_s: float = 30.0
    #: How often the sweeper expires overdue sessions.
    sweep_interval_s: float = 1.0
    #: Failed code claims one peer IP may make in a burst, and refill per second.
    claim_burst_per_ip: float = 10.0
    claim_refill_per_ip_s: float = 1.0
    #: Failed code claims the whole broker tolerates in a burst, and refill per second.
    claim_burst_global: float = 100.0
    claim_refill_global_s: float = 100.0
    #: Seconds a draining broker (SIGTERM) lets in-flight calls finish before it cancels them;
    #: new calls are refused (UNAVAILABLE) and watches ended at once, so clients move on.
    shutdown_grace_s: float = 5.0
    #: Object-store fallback: the S3 bucket; None turns the fallback off (STORE_UNAVAILABLE).
    s3_bucket: str | None = None
    #: The S3 endpoint URL (MinIO, Ceph, ...; path-style addressing); None means AWS.
    s3_endpoint: str | None = None
    #: The S3 region; None means boto3's default (AWS_DEFAULT_REGION, config files).
    s3_region: str | None = None
    #: Prefix of every object key; objects are `{prefix}{session_id}/{file_index}`.
    s3_prefix: str = "ferry/"
    #: Lifetime of each presigned URL (never past the session's expiry).
    s3_url_ttl_s: float = 900.0
    #: How often to abort multipart uploads under the prefix that no session knows.
    s3_stale_sweep_interval_s: float = 300.0
    #: TLS on the gRPC port: the certificate chain and its private key (PEM files, re-read
    #: when they change, so a renewed certificate needs no restart). None: plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: With TLS: require client certificates, verified against these CA certificates (PEM).
    tls_client_ca: Path | None = None
    #: Allow plaintext gRPC on an address that is not loopback (tokens in clear).
    insecure_plaintext: bool = False
    #: host:port of an extra plaintext port that serves only grpc.health.v1 (for probes that
    #: cannot speak TLS, such as Kubernetes' native gRPC probes). None: no such port.
    health_listen: str | None = None

    # -- Watches, offers and the data dir under attack (issue 10, findings 1 and 2) --------
    #: Open WatchSession streams one party of one session may hold at once. A client needs
    #: one (two while it re-subscribes); the bound is per party so that neither side can take
    #: the other's.
    watches_per_party: int = 4
    #: Open WatchSession streams from one address (an IPv6 address counts by its /64): 16
    #: transfers at once with both sides behind it. An idle watcher of a session with a
    #: manifest of max_manifest_bytes holds up to about 4 times that in gRPC buffers.
    watches_per_address: int = 32
    #: Open WatchSession streams on the whole broker. Measured (bench/negotiate.py): an idle
    #: watch costs about 29 KiB, 48 KiB with a connection of its own; 10,000 of them left
    #: the negotiation rate as it was.
    watches_total: int = 16_384
    #: Bytes of the sessions watched, summed over all watches (a watch counts its session's
    #: size): what watchers that do not read can pin in gRPC's buffers, in all.
    watch_bytes_total: int = 256 << 20
    #: Largest manifest, serialized: it is stored with the session and sent with every watch
    #: update. 1 MiB is 10,000 files with paths of about 90 characters.
    max_manifest_bytes: int = 1 << 20
    #: New offers one address (an IPv6 /64) may create in a burst, and gets back per second.
    offer_burst_per_address: float = 60.0
    offer_refill_per_address_s: float = 1.0
    #: How long a session is kept after it ended (completed, declined, cancelled, failed or
    #: expired) before it is deleted; a rerun of a side within it still finds its outcome.
    session_retention_s: float = 24 * 3600.0
    #: New offers are refused (RESOURCE_EXHAUSTED, STORAGE_FULL) while the data dir's file
    #: system has less free space than this: the rest stays for the sessions already live.
    min_free_disk_bytes: int = 64 << 20

    # -- Connections (a sibling of finding 8, on the broker) ------------------------------
    #: Connections the broker holds at once (each costs about 20 KiB and a descriptor: the
    #: broker raises its open-files limit to the hard one, and warns if that is short); more
    #: are closed as they come. A per-address cap belongs in front (the ingress, a firewall):
    #: gRPC has none, and this one is to keep the broker alive, not fair.
    max_connections: int = 20_000
    #: Seconds a new connection has for its TLS handshake and HTTP/2 preface (gRPC's
    #: default is 120 s: a stranger's silent connections would be held that long).
    handshake_timeout_s: float = 10.0
    #: A connection with no call for this long is closed (clients reconnect when they need
    #: to; a watch is a call, so a waiting peer's connection stays).
    connection_idle_s: float = 300.0
    #: Calls served at once, watches included (so above watches_total); beyond,
    #: RESOURCE_EXHAUSTED.
    max_concurrent_calls: int = 20_480
    #: Calls of any kind one address (an IPv6 /64) may make in a burst, and gets back per
    #: second (RESOURCE_EXHAUSTED, RATE_LIMITED beyond). A transfer makes a few dozen calls
    #: in all, progress reports included; a loop of cheap calls from one address (each a
    #: write to the store) cannot take more than this share of the broker.
    calls_burst_per_address: float = 1000.0
    calls_rate_per_address: float = 200.0

    # -- Claims, port leases and the object store under attack (issue 10, findings 3-6) ----
    #: Every per-address limit (claims, offers, watches, leases, bucket bytes) counts a
    #: caller by its source network: an IPv4 address (or its /caller_ipv4_prefix) and an
    #: IPv6 /caller_ipv6_prefix, since one IPv6 host picks any address of its /64.
    caller_ipv4_prefix: int = 32
    caller_ipv6_prefix: int = 64
    #: The broker-wide bucket of failed claims never refuses a claim; while it is empty,
    #: each failure costs its source claim_flood_cost tokens instead of one.
    claim_flood_cost: float = 10.0
    #: Wrong-verifier claims a found store-and-forward offer takes before it is given up
    #: (expired, its sender told why): its guess count stays bounded for any offer TTL.
    claim_guesses_per_offer: int = 100
    #: A claimed live offer whose claimant has not confirmed the key this long after its claim
    #: is given up when someone else claims the code (the sender is told and can re-offer):
    #: a stranger who claims first cannot hold the real receiver out for the offer's TTL.
    claim_confirm_timeout_s: float = 60.0
    #: Live port leases one caller (the receiver's address, an IPv6 /64) may hold on one
    #: listener host. A lease counts until the plan's connect deadline, and after it only
    #: while a peer has reported CONNECTING or TRANSFERRING.
    leases_per_caller: int = 16
    #: Whether senders may upload to the object store before the receiver accepted
    #: (store-and-forward): "on" or "off". Senders are anonymous today, so this is "anonymous
    #: senders may store". The fallback after acceptance is not affected.
    store_forward: str = "on"
    #: Bytes the object store may hold (sealed, reserved when a file's upload starts) for one
    #: offer, for the offers of one sender address (an IPv6 /64), and in all.
    store_max_bytes_per_offer: int = 8 << 30
    store_max_bytes_per_address: int = 16 << 30
    store_max_bytes_total: int = 128 << 30

    # -- The reflexive responder (issue 11) -----------------------------------------------
    #: host:port of the reflexive responder: STUN Binding over TCP, answered with the address
    #: and port a connection came from (how a client behind a NAT learns the public side of
    #: its data socket). "auto": listen's host, on port 0 when listen's port is 0, else on
    #: listen's port + 1 (+ 2 when that is health_listen's port). "off", "" or None: none.
    reflexive_listen: str | None = "auto"
    #: What GetBrokerInfo tells clients to dial for it, host:port; an empty host (":3478")
    #: is the broker's host as each client reached it. None: ":" and the bound port while
    #: the responder runs, nothing when it is off. Give it when clients reach the broker
    #: through a proxy or a port mapping (a responder behind a proxy that hides the
    #: callers' addresses would answer with the proxy's, uselessly).
    reflexive_advertise: str | None = None
    #: Responder connections held at once, in all and from one address (an IPv6 /64).
    reflexive_max_connections: int = 1024
    reflexive_per_address: int = 32
    #: A responder connection is closed this long after it opened (a client holds it while
    #: it punches holes through its NAT, a few seconds).
    reflexive_hold_s: float = 30.0

    # -- Operations (issue 12) ------------------------------------------------------------
    #: host:port of a plaintext HTTP port serving Prometheus metrics on /metrics (they hold
    #: no secret: no code, token, URL or session id). None: no metrics port, and
    #: prometheus-client is never imported.
    metrics_listen: str | None = None
    #: A connection older than this is sent a GOAWAY (gRPC's max_connection_age): its
    #: clients reconnect, through a load balancer perhaps to another replica, so long-lived
    #: WatchSession streams spread over replicas added later. None: connections live on
    #: (one broker has nowhere to spread them; the k8s manifests set it).
    max_connection_age_s: float | None = None
    #: What a connection past max_connection_age_s has to finish its calls before it is
    #: closed; watches never finish by themselves, so they end then and are re-opened.
    max_connection_age_grace_s: float = 10.0

    # -- People: devices, sign-in, presence, policy and audit (issue 13) --------------------
    #: Whether people without an account may use codes: "on", or "off" (then both ends of a
    #: code offer must be signed-in devices, and anonymous CreateOffer/ClaimOffer are refused
    #: with PERMISSION_DENIED, reason ANONYMOUS_DISABLED).
    anonymous: str = "on"
    #: Lifetime of an access token (SignIn); a client signs in again when it runs out.
    access_token_ttl_s: float = 900.0
    #: Lifetime of a sign-in challenge (CreateChallenge).
    challenge_ttl_s: float = 60.0
    #: A device with an open inbox stream is online; its presence record lives this long
    #: and is renewed at a third of it, so a replica that dies leaves it for this long at most.
    presence_ttl_s: float = 45.0
    #: New offers (to a person, or codes made signed in) a user may make per hour, unless the
    #: operator set the user's own (`ferry admin users set`).
    user_offers_per_hour: int = 120
    #: Bytes the object store may hold for one user's offers (sealed), unless the operator
    #: set the user's own; a signed-in sender's uploads count here instead of per address.
    user_store_bytes: int = 16 << 30
    #: The largest offer (sum of its files' sizes) the broker takes, in bytes; 0: no limit.
    max_offer_bytes: int = 0
    #: Offers that may wait in one person's inbox at once (INBOX_FULL beyond).
    inbox_max_offers: int = 100
    #: What the audit log records: "all" (every offer's steps, code offers by address, and
    #: the people events), "people" (offers to a person and the people events) or "off".
    audit: str = "all"
    #: Audit entries older than this are dropped by the sweeper.
    audit_retention_s: float = 90 * 24 * 3600.0

    def __post_init__(self) -> None:
        self._check_operations()
        self._check_people()
        self._check_store_url()
        self._check_abuse_limits()
        self._check_claim_lease_store_limits()
        self._check_reflexive()
        if not 0 < self.offer_ttl_min_s <= self.offer_ttl_default_s <= self.offer_ttl_max_s:
            raise ValueError("need 0 < offer_ttl_min_s <= offer_ttl_default_s <= offer_ttl_max_s")
        if self.session_ttl_s <= 0 or self.connect_timeout_s <= 0 or self.sweep_interval_s <= 0:
            raise ValueError("session_ttl_s, connect_timeout_s and sweep_interval_s must be > 0")
        if not 1 <= self.stream_count <= 64:
            raise ValueError("stream_count must be between 1 and 64")
        if not 1 <= self.s3_url_ttl_s <= 7 * 24 * 3600 or self.s3_stale_sweep_interval_s <= 0:
            raise ValueError("need 1 <= s3_url_ttl_s <= 7 days and s3_stale_sweep_interval_s > 0")
        if self.s3_prefix.startswith("/"):
            raise ValueError("s3_prefix must not start with '/'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.insecure_plaintext and self.tls_cert is not None:
            raise ValueError("insecure_plaintext contradicts tls_cert")
        if self.tls_cert is None and not self.insecure_plaintext and not is_loopback(self.listen):
            raise ValueError(
                f"refusing plaintext gRPC on listen {self.listen}, not a loopback address "
                "(tokens and codes would cross the network in clear): give tls_cert and "
                "tls_key, or insecure_plaintext"
            )
        if self.health_listen is not None and self.health_listen.rpartition(":")[1] != ":":
            raise ValueError("health_listen must be host:port")

    def _check_operations(self) -> None:
        """The metrics port, connection ages and the shutdown grace (issue 12)."""
        if self.metrics_listen is not None and _port_of(self.metrics_listen, 0) is None:
            raise ValueError("metrics_listen must be host:port")
        if self.max_connection_age_s is not None and self.max_connection_age_s <= 0:
            raise ValueError("max_connection_age_s must be > 0 (unset: no limit)")
        if self.max_connection_age_grace_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("max_connection_age_grace_s and shutdown_grace_s must be >= 0")

    def _check_people(self) -> None:
        """The people settings (issue 13)."""
        if self.anonymous not in ("on", "off"):
            raise ValueError("anonymous must be 'on' or 'off'")
        if self.audit not in ("all", "people", "off"):
            raise ValueError("audit must be 'all', 'people' or 'off'")
        if min(self.access_token_ttl_s, self.challenge_ttl_s, self.presence_ttl_s) < 1:
            raise ValueError("access_token_ttl_s, challenge_ttl_s and presence_ttl_s must be >= 1")
        if self.user_offers_per_hour < 1 or self.inbox_max_offers < 1:
            raise ValueError("user_offers_per_hour and inbox_max_offers must be >= 1")
        if min(self.user_store_bytes, self.max_offer_bytes) < 0 or self.audit_retention_s <= 0:
            raise ValueError(
                "user_store_bytes and max_offer_bytes must be >= 0, audit_retention_s > 0"
            )

    def _check_store_url(self) -> None:
        """None, "" and "sqlite" all mean the SQLite file; anything else is a Redis URL."""
        url = self.store_url
        if url is not None and url.strip().lower() in ("", "sqlite"):
            object.__setattr__(self, "store_url", None)  # one spelling of the default
        elif url is not None and url.partition("://")[0].lower() not in STORE_SCHEMES:
            raise ValueError("store_url must be sqlite or a redis://, rediss:// or unix:// URL")

    def _check_abuse_limits(self) -> None:
        """The limits of issue 10's findings 1 and 2 (watches, offers, retention, disk)."""
        if min(self.watches_per_party, self.watches_per_address, self.watches_total) < 1 or (
            self.watch_bytes_total < self.max_manifest_bytes
        ):
            raise ValueError(
                "watches_per_party, watches_per_address and watches_total must be >= 1, and"
                " watch_bytes_total at least max_manifest_bytes"
            )
        if self.max_manifest_bytes < 1024:
            raise ValueError("max_manifest_bytes must be at least 1024")
        if self.offer_burst_per_address < 1 or self.offer_refill_per_address_s <= 0:
            raise ValueError("need offer_burst_per_address >= 1 and offer_refill_per_address_s > 0")
        if self.session_retention_s < 0 or self.min_free_disk_bytes < 0:
            raise ValueError("session_retention_s and min_free_disk_bytes must be >= 0")
        if min(self.max_connections, self.max_concurrent_calls) < 1:
            raise ValueError("max_connections and max_concurrent_calls must be >= 1")
        if self.calls_burst_per_address < 1 or self.calls_rate_per_address <= 0:
            raise ValueError("need calls_burst_per_address >= 1 and calls_rate_per_address > 0")
        if self.handshake_timeout_s <= 0 or self.connection_idle_s <= 0:
            raise ValueError("handshake_timeout_s and connection_idle_s must be > 0")

    def _check_claim_lease_store_limits(self) -> None:
        """The limits of issue 10's findings 3 to 6 (claims, leases, object store)."""
        if not (0 <= self.caller_ipv4_prefix <= 32 and 0 <= self.caller_ipv6_prefix <= 128):
            raise ValueError("need 0 <= caller_ipv4_prefix <= 32, 0 <= caller_ipv6_prefix <= 128")
        if self.claim_flood_cost < 1 or self.claim_guesses_per_offer < 1:
            raise ValueError("claim_flood_cost and claim_guesses_per_offer must be >= 1")
        if self.claim_confirm_timeout_s <= 0 or self.leases_per_caller < 1:
            raise ValueError("need claim_confirm_timeout_s > 0 and leases_per_caller >= 1")
        if self.store_forward not in ("on", "off"):
            raise ValueError("store_forward must be 'on' or 'off'")
        quotas = (
            self.store_max_bytes_per_offer,
            self.store_max_bytes_per_address,
            self.store_max_bytes_total,
        )
        if min(quotas) < 0:
            raise ValueError("the store_max_bytes limits must be >= 0")

    def _check_reflexive(self) -> None:
        """The reflexive responder's address, what is advertised, and its limits."""
        listen = self.reflexive_listen
        if listen not in (None, "", "off", "auto") and _port_of(listen, 0) is None:
            raise ValueError("reflexive_listen must be host:port, 'auto' or 'off'")
        if listen == "auto" and _port_of(self.listen, 0, brackets=False) is None:
            raise ValueError("reflexive_listen 'auto' needs listen as host:port; give it")
        bind = self.reflexive_bind
        if bind is not None and _port_of(bind, 0, brackets=False) is None:
            raise ValueError(
                f"reflexive_listen 'auto' would be {bind}, past port 65535; give reflexive_listen"
            )
        if self.reflexive_advertise and _port_of(self.reflexive_advertise, 1) is None:
            raise ValueError(
                "reflexive_advertise must be host:port (port 1-65535; the host may be empty)"
            )
        if min(self.reflexive_max_connections, self.reflexive_per_address) < 1:
            raise ValueError("reflexive_max_connections and reflexive_per_address must be >= 1")
        if self.reflexive_hold_s <= 0:
            raise ValueError("reflexive_hold_s must be > 0")

    @property
    def reflexive_bind(self) -> str | None:
        """The host:port the reflexive responder binds ("auto" worked out); None: no responder."""
        listen = self.reflexive_listen
        if listen in (None, "", "off"):
            return None
        if listen != "auto":
            return listen
        host, _, port_text = self.listen.rpartition(":")
        port = int(port_text)
        if port == 0:
            return f"{host}:0"
        port += 1
        if self.health_listen is not None and port == _port_of(self.health_listen, 1):
            port += 1
        return f"{host}:{port}"

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return self.tls_cert is not None

    @property
    def database_path(self) -> Path:
        """The SQLite file inside data_dir."""
        return Path(self.data_dir) / "broker.sqlite3"

    @property
    def token_key_path(self) -> Path:
        """The broker's secret for repeatable claim tokens (made on first start, mode 0600)."""
        return Path(self.data_dir) / "token.key"


def _port_of(address: str, lowest: int, *, brackets: bool = True) -> int | None:
    """The port of ``host:port`` if it is one in lowest-65535, else None. The host may be
    empty; an IPv6 one must be in brackets unless ``brackets`` is False."""
    host, colon, port = address.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or not lowest <= int(port) <= 65535:
        return None
    if brackets and ":" in host and not (host.startswith("[") and host.endswith("]")):
        return None
    return int(port)


def is_loopback(listen: str) -> bool:
    """Whether every address ``host:port`` (or ``[v6]:port``) binds is a loopback one.

    An IP literal decides by itself (127.0.0.0/8, ::1; 0.0.0.0 and :: are every interface);
    ``localhost`` is loopback; any other name is resolved, and is loopback only if all its
    addresses are (a name that does not resolve is not).
    """
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos
    )


#: The environment variables that configure the object-store fallback, by BrokerConfig field.
S3_ENVIRONMENT = {
    "s3_endpoint": "FERRY_S3_ENDPOINT",
    "s3_bucket": "FERRY_S3_BUCKET",
    "s3_prefix": "FERRY_S3_PREFIX",
    "s3_region": "FERRY_S3_REGION",
    "s3_url_ttl_s": "FERRY_S3_URL_TTL",
}


def s3_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, str | float]:
    """BrokerConfig keyword arguments from the FERRY_S3_* variables that are set (non-empty).

    Credentials are not read here: boto3 finds them the usual way (AWS_ACCESS_KEY_ID, ...).
    """
    env = os.environ if environ is None else environ
    out: dict[str, str | float] = {}
    for field, var in S3_ENVIRONMENT.items():
        value = env.get(var, "").strip()
        if value:
            out[field] = float(value) if field == "s3_url_ttl_s" else value
    return out
