"""BrokerConfig: every knob of the broker, with safe defaults for a laptop."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    """How one broker process runs. All durations are in seconds."""

    #: host:port to listen on; port 0 picks a free port (the bound one is reported).
    listen: str = "127.0.0.1:50051"
    #: Directory of the SQLite database (`broker.sqlite3`); created if missing.
    data_dir: Path = Path("ferry-data")
    #: Offer lifetime when the request gives none.
    offer_ttl_default_s: float = 600.0
    #: Shortest offer lifetime a request may ask for (shorter asks are raised to it).
    offer_ttl_min_s: float = 10.0
    #: Longest offer lifetime a request may ask for (longer asks are lowered to it).
    offer_ttl_max_s: float = 24 * 3600.0
    #: Lifetime of a session (and of its port lease) from acceptance on.
    session_ttl_s: float = 24 * 3600.0
    #: Parallel data streams per session; the listener leases stream_count + 2 ports.
    stream_count: int = 4
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
    #: Seconds to let in-flight calls finish on shutdown.
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.offer_ttl_min_s <= self.offer_ttl_default_s <= self.offer_ttl_max_s:
            raise ValueError("need 0 < offer_ttl_min_s <= offer_ttl_default_s <= offer_ttl_max_s")
        if self.session_ttl_s <= 0 or self.connect_timeout_s <= 0 or self.sweep_interval_s <= 0:
            raise ValueError("session_ttl_s, connect_timeout_s and sweep_interval_s must be > 0")
        if not 1 <= self.stream_count <= 64:
            raise ValueError("stream_count must be between 1 and 64")

    @property
    def database_path(self) -> Path:
        """The SQLite file inside data_dir."""
        return Path(self.data_dir) / "broker.sqlite3"
