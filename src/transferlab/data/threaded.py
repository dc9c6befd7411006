"""In-order batches whose items are prepared on threads: decoding overlaps the forward pass.

On a machine with few cores transferlab loads data in-process (a loader *process* steals a core from
the forward pass), so a JPEG is decoded and resized while the cores that run the network wait. PIL
decodes and resizes without the GIL, so a couple of threads can do it meanwhile. Measured on a
2-core CPU, Lite0's frozen pass at 288 px over 397 phone-camera photos (12 MP): 56.3 / 56.0 s
in-line, 31.4 / 31.9 s on two threads, bit-identical features; on 500x338 photos, where the network
dominates, it is within noise of in-line.

Only for deterministic transforms: threads draw random numbers in no fixed order, so augmented
batches would differ from run to run. The order of the items, and so of the batch, never changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from torch.utils.data import default_collate

__all__ = ["threaded_batches"]


class _Indexable(Sized, Protocol):
    def __getitem__(self, index: int) -> Any: ...


def threaded_batches(dataset: _Indexable, batch_size: int, threads: int, ahead: int = 2) -> Iterator[Any]:
    """``default_collate`` of consecutive ``dataset[i]`` runs of `batch_size`, in order, as
    ``DataLoader(dataset, batch_size)`` gives them; items are prepared on `threads` threads, at most
    `ahead` batches beyond the one being consumed. An item's exception is raised where its batch is."""
    if batch_size < 1 or threads < 1:
        raise ValueError(f"batch_size and threads must be >= 1 (got {batch_size}, {threads})")
    n = len(dataset)
    starts = iter(range(0, n, batch_size))
    pending: deque[list[Future]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="transferlab-decode") as pool:

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(dataset.__getitem__, i) for i in range(start, min(n, start + batch_size))])

        try:
            for _ in range(1 + ahead):
                submit_next()
            while pending:
                batch = default_collate([future.result() for future in pending[0]])
                pending.popleft()
                yield batch
                submit_next()  # once the consumer is back for more: `ahead` batches beyond the one it held
        finally:
            # an abandoned iteration (an error, a break, Ctrl-C) leaves no decoding behind it
            for futures in pending:
                for future in futures:
                    future.cancel()
