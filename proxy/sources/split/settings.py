"""``[split]``: the Split source's settings section (environment ``FLAGPROXY_SPLIT_<KEY>``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.config import ConfigError, check_header_name


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

    def validate(self) -> None:
        if self.max_response_bytes <= 0:
            raise ConfigError(f"[split] max_response_bytes: must be positive, got {self.max_response_bytes}")
        if self.max_pages <= 0:
            raise ConfigError(f"[split] max_pages: must be positive, got {self.max_pages}")
        if self.interval_s <= 0:
            raise ConfigError(f"[split] interval_s: must be positive, got {self.interval_s}")
        if self.timeout_s <= 0:
            raise ConfigError(f"[split] timeout_s: must be positive, got {self.timeout_s}")
        if urlsplit(self.api_url).scheme not in ("http", "https"):
            raise ConfigError("[split] api_url: must be an http(s) URL")
        if self.bucketing_key_header:
            check_header_name("[split] bucketing_key_header", self.bucketing_key_header)
