"""Batches prepared on threads (`data.threaded`): the same batches as a DataLoader, in order, with
the decoding of several images overlapping; and used only where the transform is deterministic."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from conftest import TINY
from test_training import metrics_without_timings
from torch.utils.data import DataLoader

import transferlab
from transferlab.data.datasets import DecodedImages
from transferlab.data.threaded import threaded_batches
from transferlab.training import feature_cache


class _Items:
    """item i = (a tensor made from i, its name); each takes a random few milliseconds to 'decode'."""

    def __init__(self, n: int, fail_at: int | None = None, wait: threading.Barrier | None = None,
                 delay: float | None = None) -> None:
        self.n, self.fail_at, self.wait = n, fail_at, wait
        self.started: list[int] = []
        self.delays = [delay] * n if delay is not None else random.Random(0).choices([0.0, 0.002, 0.01], k=n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        self.started.append(i)
        if self.wait is not None:
            self.wait.wait()
        time.sleep(self.delays[i])
        if i == self.fail_at:
            raise ValueError(f"item {i} is broken")
        return torch.full((2, 3), float(i)), f"item{i}"


def test_batches_equal_a_dataloaders_in_order_whatever_finishes_first():
    items = _Items(23)
    threaded = list(threaded_batches(items, batch_size=5, threads=3))
    expected = list(DataLoader(items, batch_size=5))
    assert len(threaded) == len(expected) == 5  # the last batch is the partial one, 3 items
    for (x, names), (x_ref, names_ref) in zip(threaded, expected, strict=True):
        assert torch.equal(x, x_ref) and names == names_ref


def test_items_are_prepared_on_several_threads_at_once():
    # each item waits until another is in flight beside it: one thread alone would never get past
    items = _Items(8, wait=threading.Barrier(2, timeout=10))
    batches = list(threaded_batches(items, batch_size=4, threads=2))
    assert torch.cat([x for x, _ in batches])[:, 0, 0].tolist() == list(range(8))


def test_at_most_ahead_batches_are_prepared_beyond_the_one_consumed():
    items = _Items(100)
    batches = threaded_batches(items, batch_size=4, threads=2, ahead=2)
    next(batches)
    deadline = time.monotonic() + 10
    while len(items.started) < 4 * (1 + 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time enough for the threads to run further ahead, were they allowed to
    assert len(items.started) == 4 * (1 + 2)
    batches.close()


def test_an_items_error_is_raised_with_its_batch_and_the_work_queued_behind_it_is_dropped():
    items = _Items(100, fail_at=6, delay=0.2)
    batches = threaded_batches(items, batch_size=4, threads=1)
    first, _ = next(batches)
    assert first[:, 0, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="item 6 is broken"):
        next(batches)
    # items 7..15 were queued (batches 1-3); only the one already running when 6 failed still ran
    assert items.started[:7] == list(range(7)) and len(items.started) <= 8
    with pytest.raises(ValueError, match="must be >= 1"):
        next(threaded_batches(items, batch_size=4, threads=0))


def test_a_threaded_feature_pass_gives_the_in_line_features_and_keeps_the_same_images(tiny_data):
    from transferlab.data.sources import load_splits
    from transferlab.data.transforms import Preprocessing, eval_transform, eval_view
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.models.registry import resolve_backbone

    spec = resolve_backbone("test_efficientnet", pretrained=False, img_size=32)
    model = build_classifier(spec, 2, HeadConfig())
    samples = load_splits(str(tiny_data), val_split=0.2, seed=0).train
    pre = Preprocessing(input_size=32)
    kept = {}
    for threads in (1, 2):
        cache = DecodedImages(max_side=16)
        feats = feature_cache.extract_features(model, samples, eval_transform(pre), batch_size=5, decoded=cache,
                                               kept_view=eval_view(pre), decode_threads=threads)
        kept[threads] = (feats, sorted(cache.views), cache.nbytes, cache.misses)
    (f1, views1, bytes1, misses1), (f2, views2, bytes2, misses2) = kept[1], kept[2]
    assert torch.equal(f1, f2) and f1.shape[0] == len(samples) == 24
    assert views1 == views2 and len(views1) == 24 and bytes1 == bytes2 and misses1 == misses2 == 24


def test_augmented_feature_views_are_decoded_in_one_thread(tiny_data, tmp_path, monkeypatch):
    """Augmentations draw from torch's RNG; on threads the draws would land on other images each run."""
    threaded_passes = []
    real = feature_cache.threaded_batches

    def spy(dataset, batch_size, threads, *args):
        threaded_passes.append(len(dataset))
        return real(dataset, batch_size, threads, *args)

    monkeypatch.setattr(feature_cache, "threaded_batches", spy)
    runs = [transferlab.train(tiny_data, out=str(tmp_path / f"run{i}"), feature_cache="memory",
                              **{**TINY, "epochs_finetune": 0, "feature_views": 2}) for i in range(2)]
    assert threaded_passes == [24, 12] * 2  # the plain train and the val pass, not the 2 augmented views
    assert metrics_without_timings(runs[0].run_dir) == metrics_without_timings(runs[1].run_dir)
