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


def test_an_epoch_keeps_its_partial_last_batch_unless_batchnorm_trains_on_one_image():
    from transferlab.training.run import drops_last_batch

    assert not drops_last_batch(40, 32, "eval")  # two steps, not one
    assert not drops_last_batch(40, 32, "train")
    assert not drops_last_batch(33, 32, "eval")
    assert drops_last_batch(33, 32, "train")  # a batch of one: BatchNorm cannot train on it
    assert not drops_last_batch(1, 32, "train")  # the only batch is never dropped


def test_a_small_training_set_takes_every_image_each_epoch(tiny_data, tmp_path, monkeypatch):
    from torch.utils import data as tud

    seen = []
    real = tud.DataLoader.__init__

    def spy(self, dataset, *args, **kwargs):
        real(self, dataset, *args, **kwargs)
        if kwargs.get("sampler") is not None and kwargs.get("drop_last") is not None:
            seen.append(len(self))

    monkeypatch.setattr(tud.DataLoader, "__init__", spy)
    transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "batch_size": 16, "epochs_frozen": 1,
                                                               "epochs_finetune": 1})
    assert seen == [2]  # 24 train images at batch 16: two steps (the old rule dropped 8 and made one)
