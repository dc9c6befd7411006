"""Where transferlab's log lines and progress bars go: the CLI's plain stderr handler, the Python API's own
progress lines, and the one progress bar every long loop shows.

A library should not configure logging for its caller, so the API adds its handler only when nobody has
configured any (no handler on the "transferlab" logger nor on the root), and only for the call; a caller
with logging set up gets the records through it, and ``verbose=False`` keeps warnings only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["PLAIN_FORMAT", "StderrHandler", "api_logging", "progress_bar", "tracked"]

PLAIN_FORMAT = "%(levelname)-8s %(message)s"
TRACKED_MIN_ITEMS = 200  # a bar over fewer quick items would only flicker

T = TypeVar("T")


class StderrHandler(logging.StreamHandler):
    """A plain log handler writing to whatever ``sys.stderr`` is when a record comes (as the rich console
    does), not to the stream of the moment it was made: a caller may redirect stderr between commands."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextmanager
def api_logging(verbose: bool) -> Iterator[None]:
    """For one API call: progress lines (epochs, phases) on stderr as the CLI prints them, unless the caller
    configured logging; with `verbose` False, warnings and errors only."""
    logger = logging.getLogger("transferlab")
    level, added = logger.level, None
    if not verbose:
        logger.setLevel(logging.WARNING)
    elif not logger.handlers and not logging.getLogger().handlers:
        added = StderrHandler()
        added.setFormatter(logging.Formatter(PLAIN_FORMAT))
        logger.addHandler(added)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        if added is not None:
            logger.removeHandler(added)
        logger.setLevel(level)


@contextmanager
def progress_bar(enabled: bool, description: str, total: int | Callable[[], int]) -> Iterator[Callable[..., None]]:
    """``with progress_bar(on, "evaluating", n) as advance: ... advance(k)``: a transient bar (description,
    bar, done/total, time left) on an interactive stderr, else nothing, so logs and pipes get no control
    characters. `total` may be a callable: counting is skipped when no bar shows."""
    from rich.console import Console

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total() if callable(total) else total)
        yield lambda n=1: bar.advance(task, n)


def tracked(items: Iterable[T], enabled: bool, description: str, total: int) -> Iterator[T]:
    """`items`, advancing a :func:`progress_bar` per item; no bar for fewer than TRACKED_MIN_ITEMS."""
    with progress_bar(enabled and total > TRACKED_MIN_ITEMS, description, total) as advance:
        for item in items:
            yield item
            advance()
