"""metrics.csv as a user reads it."""

from __future__ import annotations

import pytest
from conftest import TINY
from guarantees import read_metrics

import transferlab


def test_the_lr_column_is_the_top_groups_not_the_deepest_blocks(tiny_data, tmp_path):
    # The same schedule with and without a per-block decay: the top group's LR does not depend on the
    # decay, the deepest block's does (÷3 per block under exp:3), so the column must agree between the two.
    runs = {decay: transferlab.train(tiny_data, out=str(tmp_path / decay.replace(":", "")),
                                     **{**TINY, "lr_decay": decay, "epochs_frozen": 1}).run_dir
            for decay in ("none", "exp:3")}
    lrs = {decay: [float(r["lr"]) for r in read_metrics(run) if r["phase"] == "finetune"] for decay, run in runs.items()}
    assert len(lrs["none"]) == TINY["epochs_finetune"]
    assert lrs["exp:3"] == pytest.approx(lrs["none"], rel=1e-6) and min(lrs["none"]) > 1e-7
