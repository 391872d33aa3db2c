"""The error type and the small value checks shared by the trainer's config dataclasses."""

from __future__ import annotations

from typing import Sequence


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def _one_of(key: str, value, allowed: Sequence):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _at_least(key: str, value, low):
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")
