"""What predicting answers by default and what serving may cost: the request, connection and time limits of
`transferlab serve`, apart from the server so the command line reads their defaults without loading the web
stack."""

from __future__ import annotations

from dataclasses import dataclass

from transferlab.errors import TransferlabError

# labels per image, and images per forward pass, of predict (CLI, API, Classifier) and serve unless told
TOP_K, PREDICT_BATCH = 3, 32


@dataclass(frozen=True)
class ServeLimits:
    """What one request, and one client, may cost. Pixels: 50 MP covers every phone camera; 150 MB of RGB
    once decoded."""

    max_upload_mb: float = 20.0
    max_files: int = 16
    max_pixels: int = 50_000_000
    max_batch: int = 32
    top_k: int = TOP_K
    header_timeout: float = 10.0  # seconds for a request's headers to arrive (from connect, or the last response)
    body_timeout: float = 60.0  # seconds for its body, from its headers: 20 MB at 2.8 Mbit/s
    max_connections: int = 256  # open connections in all: 503 past it
    # open connections per client IP (0: no limit): 429 past it, so one client cannot hold every connection
    # while the others wait. None: an eighth of max_connections (32 of 256: room for a browser's 6 per host
    # times several tabs, while it takes 8 clients at their cap to fill the server)
    max_client_connections: int | None = None

    def __post_init__(self) -> None:
        if self.max_client_connections is None and self.max_connections >= 1:
            object.__setattr__(self, "max_client_connections", max(1, self.max_connections // 8))
        rules = [("--max-upload-mb", self.max_upload_mb, self.max_upload_mb > 0, "a positive number"),
                 ("--max-files", self.max_files, self.max_files >= 1, "at least 1"),
                 ("--max-pixels", self.max_pixels, self.max_pixels >= 1, "at least 1"),
                 ("--max-batch", self.max_batch, self.max_batch >= 1, "at least 1"),
                 ("--top-k", self.top_k, self.top_k >= 1, "at least 1"),
                 ("--header-timeout", self.header_timeout, self.header_timeout > 0, "a positive number of seconds"),
                 ("--body-timeout", self.body_timeout, self.body_timeout > 0, "a positive number of seconds"),
                 ("--max-connections", self.max_connections, self.max_connections >= 1, "at least 1"),
                 ("--max-client-connections", self.max_client_connections,
                  self.max_client_connections is not None and 0 <= self.max_client_connections <= self.max_connections,
                  f"between 1 and --max-connections ({self.max_connections}), or 0 for no per-client limit")]
        for option, value, ok, rule in rules:
            if not ok:  # also catches NaN, which fails every comparison
                raise TransferlabError(f"serve {option} must be {rule}; got {value}.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
