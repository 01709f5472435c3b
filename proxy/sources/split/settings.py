"""``[split]``: the Split source's settings section (environment ``FLAGPROXY_SPLIT_<KEY>``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.config import ConfigError, check_header_name

IMPRESSIONS_MODES = ("optimized", "debug", "none")


@dataclass(frozen=True)
class SplitSettings:
    sdk_key: str = ""
    api_url: str = "https://sdk.split.io/api"
    interval_s: float = 60.0
    timeout_s: float = 10.0
    webhook_token: str = ""
    environments: tuple[str, ...] = ()
    bucketing_key_header: str = ""
    max_response_bytes: int = 32 << 20  # a body above it is refused before it is all read
    max_pages: int = 100  # pages one pull follows before it gives up (a misbehaving API)
    # Impressions and events (sent only with an sdk_key); defaults are splitio-client 10.7.0's
    impressions_mode: str = "optimized"  # "optimized" | "debug" | "none"
    events_url: str = "https://events.split.io/api"
    telemetry_url: str = "https://telemetry.split.io/api"  # unique keys (mode none, impressionsDisabled)
    traffic_type: str = "user"  # trafficTypeName of the events sent
    impressions_refresh_s: float = 0.0  # 0: the SDK's, 300 s (optimized, none) or 60 s (debug)
    impression_counts_refresh_s: float = 1800.0
    unique_keys_refresh_s: float = 900.0
    events_refresh_s: float = 10.0
    impressions_queue_size: int = 10000
    impressions_bulk_size: int = 5000
    impressions_dedup_keys: int = 500000
    events_queue_size: int = 10000
    events_bulk_size: int = 5000
    analytics_retries: int = 3
    analytics_backoff_s: float = 1.0

    def validate(self) -> None:
        if self.max_response_bytes <= 0:
            raise ConfigError(f"[split] max_response_bytes: must be positive, got {self.max_response_bytes}")
        if self.max_pages <= 0:
            raise ConfigError(f"[split] max_pages: must be positive, got {self.max_pages}")
        if self.interval_s <= 0:
            raise ConfigError(f"[split] interval_s: must be positive, got {self.interval_s}")
        if self.timeout_s <= 0:
            raise ConfigError(f"[split] timeout_s: must be positive, got {self.timeout_s}")
        for name in ("api_url", "events_url", "telemetry_url"):
            if urlsplit(getattr(self, name)).scheme not in ("http", "https"):
                raise ConfigError(f"[split] {name}: must be an http(s) URL")
        if self.bucketing_key_header:
            check_header_name("[split] bucketing_key_header", self.bucketing_key_header)
        if self.impressions_mode not in IMPRESSIONS_MODES:
            modes = '"optimized", "debug" or "none"'
            raise ConfigError(f"[split] impressions_mode: must be {modes}, got {self.impressions_mode!r}")
        if not self.traffic_type.strip():
            raise ConfigError("[split] traffic_type: must not be empty")
        if self.impressions_refresh_s < 0:
            raise ConfigError(
                f"[split] impressions_refresh_s: must be positive (or 0 for the SDK's), "
                f"got {self.impressions_refresh_s}"
            )
        for name in ("impression_counts_refresh_s", "unique_keys_refresh_s", "events_refresh_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[split] {name}: must be positive, got {getattr(self, name)}")
        for name in (
            "impressions_queue_size",
            "impressions_bulk_size",
            "impressions_dedup_keys",
            "events_queue_size",
            "events_bulk_size",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[split] {name}: must be positive, got {getattr(self, name)}")
        if self.analytics_retries < 0:
            raise ConfigError(
                f"[split] analytics_retries: must not be negative, got {self.analytics_retries}"
            )
        if self.analytics_backoff_s < 0:
            raise ConfigError(
                f"[split] analytics_backoff_s: must not be negative, got {self.analytics_backoff_s}"
            )

    @property
    def impressions_interval_s(self) -> float:
        """The effective impressions flush interval: the setting, or the SDK's default for the mode."""
        if self.impressions_refresh_s > 0:
            return self.impressions_refresh_s
        return 60.0 if self.impressions_mode == "debug" else 300.0
