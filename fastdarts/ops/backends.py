"""Backends: what each MixedOp implementation supports, and the one place that picks one.

Each backend declares the spaces and device types it supports and whether it can run here
(and why not); ``resolve`` is the only dispatch point, so a run can always say why a
backend was skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastdarts.errors import ConfigError


@dataclass(frozen=True)
class Backend:
    name: str
    spaces: frozenset[str]
    device_types: frozenset[str]
    # Returns None when usable here, else the reason it is not.
    unavailable: Callable[[], str | None] = lambda: None

    def why_not(self, space: str, device_type: str) -> str | None:
        """None if this backend can run ``space`` on ``device_type``, else the reason."""
        if space not in self.spaces:
            return f"does not implement the {space} space"
        if device_type not in self.device_types:
            return f"does not run on {device_type}"
        return self.unavailable()


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", frozenset({"rnn", "cnn"}), frozenset({"cpu", "cuda"})),
}


def resolve(name: str, space: str, device_type: str) -> Backend:
    """The backend to use; ConfigError says why a named one cannot be."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend '{name}' (available: {', '.join(BACKENDS)})")
    reason = BACKENDS[name].why_not(space, device_type)
    if reason:
        raise ConfigError(f"backend '{name}' {reason}")
    return BACKENDS[name]
