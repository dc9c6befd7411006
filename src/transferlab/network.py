"""Can a host be reached? One bounded TCP connect per host and process, shared by the model registry
(weights) and the public datasets (downloads), so both decide "offline" the same way."""

from __future__ import annotations

import functools
import socket
import threading
from urllib.parse import urlparse


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
