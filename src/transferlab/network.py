"""Can a host be reached? The environment switches that say no, then one bounded TCP connect per host and
process, shared by the model registry (weights) and the public datasets (downloads), so both decide
"offline" the same way."""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse

_TRUTHY = {"1", "true", "yes", "on"}


def offline_by_env(names: tuple[str, ...] = ("TRANSFERLAB_OFFLINE",)) -> str | None:
    """Which of the environment variables `names` forces offline, as "NAME=1 is set"; None when none does
    (read on every call: a test or a caller may set them at any time)."""
    for name in names:
        if os.environ.get(name, "").strip().lower() in _TRUTHY:
            return f"{name}=1 is set"
    return None


def address(url: str) -> tuple[str, int]:
    """(host, port) of ``url``; the port defaults by scheme."""
    parts = urlparse(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return parts.hostname or "", port


@functools.cache
def probe(host: str, port: int, timeout: float) -> bool:
    """One TCP connect, bounded by ``timeout`` in total: DNS lookups ignore socket timeouts, so the
    attempt runs in a daemon thread that is abandoned if it takes longer."""
    if not host:
        return False
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=attempt, name="transferlab-online-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])
