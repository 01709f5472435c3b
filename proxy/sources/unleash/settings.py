"""``[unleash]``: the Unleash source's settings section (environment ``FLAGPROXY_UNLEASH_<KEY>``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.config import ConfigError


@dataclass(frozen=True)
class UnleashSettings:
    api_url: str = ""  # e.g. https://unleash.example.com/api is given as https://unleash.example.com
    client_token: str = ""
    client_token_env: str = ""  # the name of an environment variable holding the client token
    app_name: str = "flagproxy"
    environment: str = "default"
    instance_id: str = ""  # "" = the host name and process id
    interval_s: float = 15.0
    timeout_s: float = 10.0
    webhook_token: str = ""  # the Authorization header Unleash's webhook integration sends ("" = disabled)
    max_response_bytes: int = 32 << 20

    def validate(self) -> None:
        if self.api_url and urlsplit(self.api_url).scheme not in ("http", "https"):
            raise ConfigError("[unleash] api_url: must be an http(s) URL")
        if self.interval_s <= 0:
            raise ConfigError(f"[unleash] interval_s: must be positive, got {self.interval_s}")
        if self.timeout_s <= 0:
            raise ConfigError(f"[unleash] timeout_s: must be positive, got {self.timeout_s}")
        if self.max_response_bytes <= 0:
            raise ConfigError(
                f"[unleash] max_response_bytes: must be positive, got {self.max_response_bytes}"
            )
        if self.client_token and self.client_token_env:
            raise ConfigError("[unleash] client_token and client_token_env: set one of them, not both")
        if self.client_token_env and self.client_token_env not in os.environ:
            raise ConfigError(f"[unleash] client_token_env: ${self.client_token_env} is not set")

    @property
    def token(self) -> str:
        """The client token, from the setting or the environment variable it names."""
        if self.client_token_env:
            return os.environ.get(self.client_token_env, "")
        return self.client_token
