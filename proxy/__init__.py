"""flagproxy: a feature-flag reverse proxy."""

__version__ = "0.1.0"
