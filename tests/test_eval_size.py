"""Two resolutions: fine-tuning crops at img_size, everything evaluated (frozen features, validation,
the saved model's preprocessing) at eval_size, which defaults to the backbone's test size (FixRes)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from PIL import Image

import transferlab
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.models.registry import BackboneSpec, _timm_test_size, resolve_backbone
from transferlab.training import feature_cache
from transferlab.training.features import resolve_sizes


def _spec(test_size: int | None) -> BackboneSpec:
    spec = resolve_backbone("test_efficientnet", pretrained=False)
    return BackboneSpec(**{**spec.__dict__, "test_size": test_size})


def test_the_backbone_test_size_is_the_default_eval_size():
    cfg = TrainConfig(data="x")
    spec, train_pre = resolve_sizes(cfg, _spec(test_size=200))
    assert (cfg.img_size, cfg.eval_size) == (160, 200)
    assert spec.preprocessing.input_size == 200 and train_pre.input_size == 160


def test_without_a_test_size_evaluation_runs_at_the_training_size():
    cfg = TrainConfig(data="x", img_size=64)
    spec, train_pre = resolve_sizes(cfg, _spec(test_size=None))
    assert cfg.eval_size == 64 and spec.preprocessing.input_size == train_pre.input_size == 64


def test_shipped_lite0_has_its_measured_test_size_unless_a_size_is_chosen():
    assert resolve_backbone("efficientnet_lite0").test_size == 288
    assert resolve_backbone("efficientnet_lite0", img_size=96).test_size is None
    assert resolve_backbone("efficientnet_lite0", pretrained=False).test_size is None
    assert resolve_backbone("efficientnet_lite2").test_size is None  # measured: no gain


def test_timm_test_input_size_is_used_only_where_the_model_takes_any_size():
    pre = resolve_backbone("test_resnet", pretrained=False).preprocessing.with_size(224)
    assert _timm_test_size({"test_input_size": (3, 288, 288)}, pre) == 288
    assert _timm_test_size({"test_input_size": (3, 288, 288), "fixed_input_size": True}, pre) is None
    assert _timm_test_size({"test_input_size": (3, 224, 224)}, pre) is None
    assert _timm_test_size({}, pre) is None


def test_features_validation_and_the_saved_model_use_eval_size_and_fine_tuning_crops_img_size(
        tiny_data, tmp_path, monkeypatch):
    from transferlab.training import finetune

    extracted, trained, validated = [], [], []
    real_extract = feature_cache.extract_features

    def spy_extract(model, samples, transform, *a, **k):
        extracted.append(transform(Image.open(samples[0].path).convert("RGB")).shape[-1])
        return real_extract(model, samples, transform, *a, **k)

    real_train, real_val = finetune.FineTuneModule.training_step, finetune.FineTuneModule.validation_step

    def spy_train(self, batch, batch_idx):
        trained.append(batch[0].shape[-1])
        return real_train(self, batch, batch_idx)

    def spy_val(self, batch, batch_idx):
        validated.append(batch[0].shape[-1])
        return real_val(self, batch, batch_idx)

    monkeypatch.setattr(feature_cache, "extract_features", spy_extract)
    monkeypatch.setattr(finetune.FineTuneModule, "training_step", spy_train)
    monkeypatch.setattr(finetune.FineTuneModule, "validation_step", spy_val)
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "img_size": 32, "eval_size": 48})

    assert set(extracted) == {48} and set(trained) == {32} and set(validated) == {48}
    assert (result.summary["img_size"], result.summary["eval_size"]) == (32, 48)
    saved = json.loads((result.run_dir / "model.json").read_text())
    assert saved["preprocessing"]["input_size"] == 48  # what predict and export resize to
    # the evaluated accuracy of the saved model matches the run's best (same resolution)
    evaluated = transferlab.evaluate(result.run_dir, plots=False, progress=False)
    assert evaluated.metrics["accuracy"] == pytest.approx(result.summary["val_accuracy_best"])


def test_a_fixed_size_backbone_refuses_a_different_eval_size_before_any_training(tiny_data, tmp_path):
    with pytest.raises(TransferlabError, match="fixed input size.*--eval-size 48 must equal --img-size 32"):
        transferlab.train(tiny_data, out=str(tmp_path / "run"),
                          **{**TINY, "backbone": "vit_tiny_patch16_224", "img_size": 32, "eval_size": 48})
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_eval_size_is_recorded_in_the_config_so_a_resumed_run_keeps_it(tiny_data, tmp_path):
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "img_size": 32, "eval_size": 40})
    assert TrainConfig.load(result.run_dir / "config.yaml").eval_size == 40


def test_select_probes_and_measures_at_the_test_size_and_training_reuses_its_features(
        tiny_data, tmp_path, monkeypatch, extraction_calls):
    import dataclasses

    from transferlab.models import registry
    from transferlab.models.catalog import measure_backbone
    from transferlab.training import run as run_mod

    real = registry.resolve_backbone

    def with_test_size(name, **kw):  # a random-init test model standing in for pretrained weights with one
        spec = real(name, **kw)
        return dataclasses.replace(spec, test_size=48) if kw.get("img_size") is None else spec

    monkeypatch.setattr(registry, "resolve_backbone", with_test_size)
    monkeypatch.setattr(run_mod, "resolve_backbone", with_test_size)
    row = transferlab.select(tiny_data, "test_efficientnet", out=tmp_path / "sel", pretrained=False,
                             progress=False).rows[0]
    spec = real("test_efficientnet", pretrained=False)
    assert row["input_size"] == 48
    at_48 = dataclasses.replace(spec, preprocessing=spec.preprocessing.with_size(48))
    assert row["gflops"] == pytest.approx(measure_backbone(at_48)["gflops"])
    assert row["gflops"] != pytest.approx(measure_backbone(spec)["gflops"])  # not at the native 160 px
    passes = len(extraction_calls)
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"),
                               **{**TINY, "img_size": None, "strategy": "head-only"})
    assert result.summary["eval_size"] == 48 and len(extraction_calls) == passes  # select's cached features
