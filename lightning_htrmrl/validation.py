"""Bad user input: one error type, raised before any heavy work, printed by the CLI as one line.

Every message names the config key as ``htrmrl fit --print_config`` shows it (for example
``data.benchmark.init_args.episode_length``) and what is allowed.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input; the CLI prints it as one ``error:`` line and exits with code 2."""


def require_positive(key: str, value: int | float) -> None:
    """Raise :class:`ConfigError` naming ``key`` if ``value`` is not > 0."""
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def require_non_negative(key: str, value: int | float) -> None:
    """Raise :class:`ConfigError` naming ``key`` if ``value`` is not >= 0 (seeds, coefficients)."""
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
