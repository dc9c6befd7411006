"""Test-only pause points, so a test can `kill -9` the process at a named moment (not by timing).

With TRANSFERLAB_PAUSE_AT="NAME:K", the K-th call of pause_point("NAME") creates the file named by
TRANSFERLAB_PAUSE_FILE and sleeps until killed. Unset (always, outside tests), a call costs one
environment lookup. Points: "extract_batch" (after each feature-extraction batch), "finetune_step"
(at each fine-tuning step). Used by tests/test_guarantees_interruptions.py.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

_calls: Counter[str] = Counter()


def pause_point(name: str) -> None:
    target = os.environ.get("TRANSFERLAB_PAUSE_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _calls[name] += 1
    if _calls[name] == int(nth or 1):
        Path(os.environ["TRANSFERLAB_PAUSE_FILE"]).write_text(name)
        time.sleep(600)
