"""Speed levers that must not change results: the decoded-image cache and the time-budget planner."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from test_training import metrics_without_timings, read_metrics

import transferlab
from transferlab.config import TrainConfig, parse_duration
from transferlab.data import datasets
from transferlab.data.datasets import DecodedImages
from transferlab.data.sources import Sample
from transferlab.errors import TransferlabError
from transferlab.training.budget import TimeBudgetStop, estimate_epoch_seconds, plan_finetune_epochs
from transferlab.training.progressive import progressive_sizes


def test_decoded_images_decode_each_file_once(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(path)
    calls = []
    real = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda p: calls.append(p) or real(p))
    cache = DecodedImages(max_side=64)
    first, again = cache.get(path), cache.get(path)
    assert first is again and len(calls) == 1
    assert (cache.hits, cache.misses, cache.nbytes) == (1, 1, 20 * 30 * 3)


def test_huge_images_are_kept_downscaled_but_exact_reads_return_the_file_pixels(tmp_path):
    path = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(path)
    cache = DecodedImages(max_side=50)
    exact = cache.get(path, exact=True)
    kept = cache.get(path)
    assert exact.size == (300, 200) and kept.size == (75, 50)
    assert np.array_equal(np.asarray(cache.get(path, exact=True)), np.asarray(Image.open(path).convert("RGB")))


def test_huge_images_are_kept_reduced_by_a_whole_factor_to_at_least_max_side(tmp_path):
    sizes = {"huge": (200, 330), "between": (120, 90)}  # (height, width); max_side 64: 200 // 64 = 3, 120 < 2 * 64
    for name, (h, w) in sizes.items():
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    cache = DecodedImages(max_side=64)
    huge, between = cache.get(tmp_path / "huge.png"), cache.get(tmp_path / "between.png")
    assert huge.size == (110, 67) and min(huge.size) >= 64  # a partial last block of rows is averaged too
    assert between.size == (90, 120) and cache.downscaled == {str(tmp_path / "huge.png")}
    exact = np.asarray(Image.open(tmp_path / "huge.png").convert("RGB"), dtype=np.float64)
    box = exact[:198, :330].reshape(66, 3, 110, 3, 3).mean(axis=(1, 3))  # a 3x3 box average, not a subsample
    assert np.abs(np.asarray(huge, dtype=np.float64)[:66] - box).max() <= 1


def test_eval_views_are_computed_once_and_equal_the_eval_transform(tmp_path):
    from transferlab.data.transforms import Preprocessing, eval_transform, eval_view

    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    pre = Preprocessing(input_size=32)
    key, pixels, to_input = eval_view(pre)
    calls = []
    cache = DecodedImages(max_side=64)
    ds = datasets.ImageDataset([Sample(path=path, label=1)], eval_transform(pre), decoded=cache, exact_pixels=True,
                               kept_view=(key, lambda im: calls.append(1) or pixels(im), to_input))
    first, again = ds[0], ds[0]
    assert len(calls) == 1 and cache.views[(str(path), key)].dtype == torch.uint8
    expected = eval_transform(pre)(Image.open(path).convert("RGB"))
    assert torch.equal(first[0], expected) and torch.equal(again[0], expected) and first[1] == 1
    assert cache.nbytes == 3 * 32 * 32 and not cache.images  # the view is kept, not the decoded image it came from


def test_validation_images_are_resized_once_per_run_not_once_per_epoch(tiny_data, tmp_path, monkeypatch):
    from torchvision.transforms import v2

    resizes = []
    real = v2.Resize.__call__
    monkeypatch.setattr(v2.Resize, "__call__", lambda self, *a, **k: resizes.append(1) or real(self, *a, **k))
    transferlab.train(tiny_data, out=str(tmp_path / "run"), feature_cache="memory", **{**TINY, "epochs_finetune": 3})
    # the feature pass resizes the 24 train and 12 val images once; 3 epochs of validation reuse the val
    # views (training crops are RandomResizedCrop, not Resize); without them: 36 + 3 x 12
    assert len(resizes) == 36


def test_decoded_image_cache_stops_growing_at_its_memory_cap(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 10, 3), i, np.uint8)).save(paths[-1])
    cache = DecodedImages(max_side=64, max_bytes=2 * 300)
    for p in paths:
        cache.get(p)
    assert len(cache.images) == 2 and cache.nbytes == 600
    assert np.asarray(cache.get(paths[2])).max() == 2  # still served, just decoded again


def test_decode_cache_changes_nothing_in_the_metrics(tiny_data, tmp_path):
    on = transferlab.train(tiny_data, out=str(tmp_path / "on"), feature_cache="memory", **TINY)
    off = transferlab.train(tiny_data, out=str(tmp_path / "off"), feature_cache="memory", decode_cache=False, **TINY)
    assert metrics_without_timings(on.run_dir) == metrics_without_timings(off.run_dir)


def test_fine_tuning_epochs_decode_every_image_only_once(tiny_data, tmp_path, monkeypatch):
    decoded = []
    real = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda p, *a: decoded.append(str(p)) or real(p, *a))
    transferlab.train(tiny_data, out=str(tmp_path / "run"), feature_cache="memory", **{**TINY, "epochs_finetune": 3})
    assert len(decoded) == len(set(decoded)) == 24 + 12  # 12+12 train, 6+6 val; 1 extraction + 3 epochs


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("2m", 120), ("1h30m", 5400), ("1.5h", 5400), ("45", 45)])
def test_time_budget_accepts_common_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2x", "", "-3", "0s", "m"])
def test_time_budget_rejects_what_is_not_a_positive_duration(text):
    with pytest.raises(TransferlabError, match="time budget"):
        TrainConfig(data="x", time_budget=text).validate()


def test_plan_keeps_the_requested_epochs_that_fit():
    assert plan_finetune_epochs(8, seconds_left=100, epoch_seconds=30) == 3
    assert plan_finetune_epochs(2, seconds_left=100, epoch_seconds=30) == 2
    assert plan_finetune_epochs(8, seconds_left=-5, epoch_seconds=30) == 0
    assert plan_finetune_epochs(8, seconds_left=100, epoch_seconds=None) == 8


def test_epoch_estimate_charges_fp32_training_after_bf16_features():
    same = estimate_epoch_seconds(100, 50, 100.0, extract_precision="32-true", training_precision="32-true")
    mixed = estimate_epoch_seconds(100, 50, 100.0, extract_precision="bf16-mixed", training_precision="32-true")
    assert same == pytest.approx(100 * 3 / 100 + 50 / 100)
    assert mixed > same


def test_budget_stop_ends_training_when_another_epoch_would_overrun():
    clock = iter([0.0, 10.0, 10.0, 25.0])  # epoch 1 takes 10 s, epoch 2 takes 15 s; deadline at 38 s
    stop = TimeBudgetStop(deadline=38.0, clock=lambda: next(clock))
    trainer = SimpleNamespace(should_stop=False)
    stop.on_train_epoch_start(trainer, None)
    stop.on_train_epoch_end(trainer, None)  # 10 + 10 = 20 <= 38: go on
    assert not trainer.should_stop
    stop.on_train_epoch_start(trainer, None)
    stop.on_train_epoch_end(trainer, None)  # 25 + 15 = 40 > 38: stop
    assert trainer.should_stop and stop.stopped


def test_a_budget_smaller_than_the_frozen_stage_skips_fine_tuning_and_says_so(tiny_data, tmp_path):
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), time_budget="0.01s", **TINY)
    phases = {row["phase"] for row in read_metrics(result.run_dir)}
    assert phases == {"frozen"}
    budget = json.loads((result.run_dir / "summary.json").read_text())["time_budget"]
    assert budget["planned_finetune_epochs"] == 0 and budget["seconds"] == 0.01
    assert budget["estimated_epoch_seconds"] > 0  # planned from the measured frozen-forward throughput


def test_a_generous_budget_keeps_every_requested_epoch(tiny_data, tmp_path):
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), time_budget="1h", **TINY)
    rows = read_metrics(result.run_dir)
    assert sum(r["phase"] == "finetune" for r in rows) == TINY["epochs_finetune"]
    assert result.summary["time_budget"]["planned_finetune_epochs"] == TINY["epochs_finetune"]


def test_sample_paths_key_the_cache_not_object_identity(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    cache = DecodedImages(max_side=64)
    cache.get(Sample(path=path, label=0).path)
    cache.get(str(path))
    assert cache.misses == 1


def test_progressive_sizes_rise_to_the_full_size_on_the_last_epoch():
    assert progressive_sizes(224, 4, 0.5) == [128, 160, 192, 224]
    assert progressive_sizes(224, 1, 0.5) == [224]
    assert all(s % 32 == 0 for s in progressive_sizes(300, 6, 0.3)[:-1])


def test_progressive_resizing_trains_small_first_and_validates_at_full_size(tiny_data, tmp_path, monkeypatch, caplog):
    from transferlab.training import finetune

    seen = []
    real = finetune.FineTuneModule.training_step

    def spy(self, batch, batch_idx):
        seen.append((self.trainer.current_epoch, batch[0].shape[-1]))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(finetune.FineTuneModule, "training_step", spy)
    opts = {**TINY, "img_size": 64, "epochs_finetune": 3}
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), progressive_resize=0.5, **opts)
    assert sorted({s for _, s in seen}) == [32, 64] and seen[-1][1] == 64
    assert {s for e, s in seen if e == 0} == {32}
    assert result.summary["img_size"] == 64
    # after a frozen stage at full size, the smaller first epochs are a mismatch worth a warning
    assert "progressive resizing after the frozen stage" in caplog.text


def test_progressive_resizing_without_a_frozen_stage_does_not_warn(tiny_data, tmp_path, caplog):
    opts = {**TINY, "img_size": 64, "epochs_finetune": 2, "strategy": "full"}
    transferlab.train(tiny_data, out=str(tmp_path / "run"), progressive_resize=0.5, **opts)
    assert "progressive resizing: fine-tuning epochs at [32, 64]" in caplog.text
    assert "progressive resizing after the frozen stage" not in caplog.text


def test_compile_auto_only_for_large_cpu_passes():
    from transferlab.training.feature_cache import COMPILE_MIN_IMAGES, should_compile

    assert not should_compile("auto", "cpu", COMPILE_MIN_IMAGES - 1)
    assert should_compile("auto", "cpu", COMPILE_MIN_IMAGES)
    assert not should_compile("auto", "cuda", 10 * COMPILE_MIN_IMAGES)  # not measured on GPUs: eager
    assert should_compile("on", "cpu", 1) and not should_compile("off", "cpu", 10**9)


def test_compiled_extraction_pads_the_last_batch_and_falls_back_to_eager_when_compilation_fails(
        tiny_data, monkeypatch, caplog):
    """A failing compiler (no C toolchain, unsupported op) must never cost a run: features come out
    equal to the eager ones, with a warning."""
    import torch

    from transferlab.data.sources import load_splits
    from transferlab.data.transforms import Preprocessing, eval_transform
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.models.registry import resolve_backbone
    from transferlab.training import feature_cache

    def broken_compile(model, **kwargs):
        def fail(x):
            raise RuntimeError("no C compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    spec = resolve_backbone("test_efficientnet", pretrained=False, img_size=32)
    model = build_classifier(spec, 2, HeadConfig())
    samples = load_splits(str(tiny_data), val_split=0.2, seed=0).train  # 24 images: 16 + a padded 8
    tf = eval_transform(Preprocessing(input_size=32))
    eager = feature_cache.extract_features(model, samples, tf, batch_size=16)
    compiled = feature_cache.extract_features(model, samples, tf, batch_size=16, compiled=True)
    assert compiled.shape == eager.shape == (24, eager.shape[1])
    assert torch.allclose(compiled, eager, atol=1e-6)
    assert "torch.compile failed" in caplog.text


def test_the_report_after_training_evaluates_from_the_kept_val_views(tiny_data, tmp_path, monkeypatch):
    from torchvision.transforms import v2

    resizes = []
    real = v2.Resize.__call__
    monkeypatch.setattr(v2.Resize, "__call__", lambda self, *a, **k: resizes.append(1) or real(self, *a, **k))
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), feature_cache="memory",
                               **{**TINY, "epochs_finetune": 1, "report": True})
    assert (result.run_dir / "report.html").is_file() and (result.run_dir / "eval-val.json").is_file()
    cams = (result.run_dir / "report.html").read_text().count('alt="class-activation map of ')
    # the feature pass (36) and the class-activation maps' own views; the report's evaluation of the 12 val
    # images reuses the feature pass's
    assert len(resizes) == 36 + cams


def test_fine_tuning_after_cached_features_decodes_on_threads_before_its_first_epoch(tiny_data, tmp_path, monkeypatch):
    """With features from the disk cache the feature pass decodes nothing; the first fine-tuning epoch
    would then decode every file in line with training. They are decoded on threads first instead."""
    import threading

    cold = transferlab.train(tiny_data, out=str(tmp_path / "cold"), feature_cache="disk", **TINY)
    decoded_on = []
    real = datasets.load_image
    monkeypatch.setattr(datasets, "load_image",
                        lambda p, *a: decoded_on.append(threading.current_thread().name) or real(p, *a))
    warm = transferlab.train(tiny_data, out=str(tmp_path / "warm"), feature_cache="disk", **TINY)
    assert len(decoded_on) == 24 + 12 and all(name.startswith("transferlab-prefill") for name in decoded_on)
    assert metrics_without_timings(warm.run_dir) == metrics_without_timings(cold.run_dir)
    assert "decoding" in warm.summary["phase_seconds"] and "decoding" not in cold.summary["phase_seconds"]
