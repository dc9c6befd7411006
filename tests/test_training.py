"""The spine end to end on tiny generated data: run directory, strategies, cache, BN policy, resume."""

from __future__ import annotations

import csv
import json
import time
from datetime import datetime, timedelta

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

import transferlab
from transferlab.config import TrainConfig
from transferlab.training import feature_cache
from transferlab.training import run as run_module
from transferlab.training.checkpoint import load_training_state


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def metrics_without_timings(run_dir):
    """metrics.csv rows minus the wall-clock columns: what must repeat exactly for the same seed."""
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in read_metrics(run_dir)]


def test_two_stage_run_writes_complete_run_directory(tiny_data, tmp_path):
    called = time.time()
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "report": True})
    returned = time.time()
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "summary.json", "curves.png", "model.safetensors",
                 "model.json", "train.log", "data.json", "report.html", "eval-val.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("backbone", "classes", "num_train", "num_val", "val_accuracy_best", "val_accuracy_final",
                "phase_seconds", "total_seconds", "skipped_files"):
        assert key in summary
    assert summary["classes"] == ["blue", "red"]
    assert summary["num_train"] == 24 and summary["num_val"] == 12
    # when training began (UTC), so an outside timer can tell start-up and the report from training
    started = datetime.fromisoformat(summary["started_at"])
    assert started.utcoffset() == timedelta(0)
    assert called - 0.001 <= started.timestamp() <= returned - summary["total_seconds"] + 0.01  # kept to the ms
    assert {"feature_extraction", "head_training", "finetune"} <= set(summary["phase_seconds"])
    rows = read_metrics(run)
    assert [r["phase"] for r in rows] == ["frozen"] * 3 + ["finetune"] * 2
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 1, 2]
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed)
    assert summary["val_accuracy_best"] == max(float(r["val_accuracy"]) for r in rows)
    # tinted squares are trivially separable: anything near chance means the loop is broken
    assert summary["val_accuracy_best"] >= 0.9
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"] == ["blue", "red"]
    assert meta["backbone"]["name"] == "test_efficientnet"
    assert meta["preprocessing"]["input_size"] == 32
    state = load_file(run / "model.safetensors")
    assert any("head" in k for k in state)


@pytest.mark.parametrize(
    "strategy, phases",
    [("head-only", {"frozen"}), ("full", {"finetune"}), ("scratch", {"finetune"})],
)
def test_each_strategy_runs_its_phases(tiny_data, tmp_path, strategy, phases):
    result = transferlab.train(tiny_data, out=str(tmp_path / strategy), strategy=strategy, **TINY)
    assert {r["phase"] for r in read_metrics(result.run_dir)} == phases


def test_frozen_stage_runs_the_backbone_once_per_image(tiny_data, tmp_path, extraction_calls):
    calls = extraction_calls
    opts = {**TINY, "epochs_frozen": 10}
    transferlab.train(tiny_data, out=str(tmp_path / "r"), strategy="head-only", **opts)
    # 10 head epochs, yet one pass over train (24) and one over val (12)
    assert sorted(calls) == [12, 24]


def test_feature_cache_is_reused_across_runs_with_identical_results(tiny_data, tmp_path, monkeypatch):
    opts = {**TINY, "strategy": "head-only"}
    first = transferlab.train(tiny_data, out=str(tmp_path / "a"), **opts)
    calls = []
    monkeypatch.setattr(feature_cache, "extract_features", lambda *a, **k: calls.append(1))
    second = transferlab.train(tiny_data, out=str(tmp_path / "b"), **opts)
    assert calls == []
    # a cache hit must reproduce a cache miss exactly: same seed, same metrics
    assert metrics_without_timings(second.run_dir) == metrics_without_timings(first.run_dir)
    assert second.val_accuracy_best >= 0.9


def test_corrupt_feature_cache_is_rebuilt(tiny_data, tmp_path):
    opts = {**TINY, "strategy": "head-only"}
    first = transferlab.train(tiny_data, out=str(tmp_path / "a"), **opts)
    cache_files = list(feature_cache.default_cache_dir().glob("*.safetensors"))
    assert cache_files
    for f in cache_files:
        f.write_bytes(b"garbage")
    second = transferlab.train(tiny_data, out=str(tmp_path / "b"), **opts)
    assert second.val_accuracy_best == first.val_accuracy_best


def test_same_seed_gives_identical_metrics(tiny_data, tmp_path):
    def metrics(name):
        r = transferlab.train(tiny_data, out=str(tmp_path / name), seed=3, feature_cache="memory", **TINY)
        return metrics_without_timings(r.run_dir)

    assert metrics("a") == metrics("b")


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}


@pytest.mark.parametrize("bn, should_change", [("eval", False), ("train", True)])
def test_batchnorm_policy_is_applied_while_fine_tuning(tiny_data, tmp_path, bn, should_change):
    opts = {**TINY, "strategy": "two-stage"}
    r = transferlab.train(tiny_data, out=str(tmp_path / bn), bn=bn, **opts)
    stage1 = load_file(r.run_dir / "checkpoints" / "stage1.safetensors")
    last = load_training_state(r.run_dir / "checkpoints" / "last")[0]
    changed = any(not torch.equal(stage1[k], last[k]) for k in stage1 if "running_mean" in k)
    assert changed is should_change


def test_mlp_head_and_partial_unfreeze(tiny_data, tmp_path):
    r = transferlab.train(tiny_data, out=str(tmp_path / "mlp"), head="mlp", head_hidden=16, unfreeze=1, **TINY)
    meta = json.loads((r.run_dir / "model.json").read_text())
    assert meta["head"]["kind"] == "mlp" and meta["head"]["hidden"] == 16
    stage1 = load_file(r.run_dir / "checkpoints" / "stage1.safetensors")
    last = load_training_state(r.run_dir / "checkpoints" / "last")[0]
    # the stem is below the last block: frozen, so byte-identical after fine-tuning
    stem = [k for k in stage1 if k.startswith("conv_stem")]
    assert stem and all(torch.equal(stage1[k], last[k]) for k in stem)


def test_resume_continues_an_interrupted_fine_tuning(tiny_data, tmp_path, monkeypatch):
    opts = {**TINY, "epochs_finetune": 3, "feature_cache": "memory"}
    full = transferlab.train(tiny_data, out=str(tmp_path / "full"), **opts)

    real_end = run_module._RunCallback.on_train_epoch_end

    def interrupt_after_second(self, trainer, pl_module):
        real_end(self, trainer, pl_module)
        if self.state.finetune_epochs_done == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(run_module._RunCallback, "on_train_epoch_end", interrupt_after_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        transferlab.train(tiny_data, out=str(tmp_path / "cut"), **opts)
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(run_module._RunCallback, "on_train_epoch_end", real_end)
    resumed = transferlab.train(resume=tmp_path / "cut")
    assert metrics_without_timings(resumed.run_dir) == metrics_without_timings(full.run_dir)


def test_refuses_to_overwrite_an_existing_run(tiny_data, tmp_path):
    opts = {**TINY, "strategy": "head-only"}
    transferlab.train(tiny_data, out=str(tmp_path / "r"), **opts)
    with pytest.raises(transferlab.TransferlabError, match="--resume"):
        transferlab.train(tiny_data, out=str(tmp_path / "r"), **opts)


def test_invalid_configuration_is_rejected_before_work():
    with pytest.raises(transferlab.TransferlabError, match="strategy"):
        TrainConfig(data="x", strategy="magic").validate()
    with pytest.raises(transferlab.TransferlabError, match="lr_decay|decay"):
        TrainConfig(data="x", lr_decay="exp:").validate()


def test_predict_returns_top_k_and_reports_bad_files(tiny_data, tmp_path):
    r = transferlab.train(tiny_data, out=str(tmp_path / "r"), strategy="head-only", **TINY)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    red = tiny_data / "val" / "red"
    results = transferlab.predict(r.run_dir, [red, bad, tmp_path / "missing.png"], top_k=2)
    assert len(results) == 6 + 2
    good = [x for x in results if "predictions" in x]
    assert len(good) == 6
    for x in good:
        assert len(x["predictions"]) == 2
        probs = [p["probability"] for p in x["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0.99 <= sum(probs) <= 1.0001
    assert sum(x["predictions"][0]["label"] == "red" for x in good) >= 5
    errors = {x["path"]: x["error"] for x in results if "error" in x}
    assert str(bad) in errors and str(tmp_path / "missing.png") in errors


def test_demo_trains_lite0_on_the_digits(tmp_path):
    r = transferlab.demo(out=tmp_path / "demo", img_size=32, strategy="head-only", epochs_frozen=4,
                         progress=False, report=False)
    assert r.summary["backbone"] == "efficientnet_lite0" and r.summary["pretrained"]
    assert r.summary["num_train"] + r.summary["num_val"] == 1797
    assert len(r.classes) == 10
    assert r.val_accuracy_best > 0.5  # real ImageNet features separate digits even at 32 px


def test_augmented_feature_views_multiply_the_cached_train_set(tiny_data, tmp_path, monkeypatch):
    seen = {}
    real = run_module.train_head

    def spy(head, train_x, train_y, val_x, val_y, **kw):
        seen["train"], seen["val"] = tuple(train_x.shape), tuple(val_x.shape)
        seen["labels"] = train_y.tolist()
        return real(head, train_x, train_y, val_x, val_y, **kw)

    monkeypatch.setattr(run_module, "train_head", spy)
    transferlab.train(tiny_data, out=str(tmp_path / "r"), strategy="head-only", feature_views=2, **TINY)
    assert seen["train"][0] == 3 * 24 and seen["val"][0] == 12
    assert seen["labels"][:24] == seen["labels"][24:48] == seen["labels"][48:]


def test_blocks_with_negligible_learning_rate_are_frozen_not_back_propagated():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    groups = [{"params": [p], "lr": lr, "name": str(i)} for i, (p, lr) in enumerate(zip(params, (1e-4, 1e-6, 1e-8)))]
    kept = run_module.freeze_negligible_groups(groups, top_lr=1e-4)
    assert [g["name"] for g in kept] == ["0", "1"]
    assert [p.requires_grad for p in params] == [True, True, False]


@pytest.mark.parametrize("requested, accelerator, training, bf16_cpu, expected", [
    ("auto", "cpu", "32-true", True, torch.bfloat16),   # features in bf16, training steps fp32
    ("auto", "cpu", "32-true", False, None),            # no native bf16: everything fp32
    ("32-true", "cpu", "32-true", True, None),          # asked for full precision: validation too
    ("auto", "cuda", "bf16-mixed", True, None),         # Lightning's autocast already covers validation
])
def test_validation_precision_follows_the_frozen_features_when_training_is_full_precision(
        monkeypatch, requested, accelerator, training, bf16_cpu, expected):
    from transferlab import _runtime

    monkeypatch.setattr(_runtime, "cpu_supports_bf16", lambda: bf16_cpu)
    assert run_module._validation_autocast(requested, accelerator, training) == expected


def test_fine_tuning_validates_in_bf16_and_trains_in_fp32_on_a_cpu_with_native_bf16(tiny_data, tmp_path, monkeypatch):
    from transferlab import _runtime
    from transferlab.training import finetune

    monkeypatch.setattr(_runtime, "cpu_supports_bf16", lambda: True)
    passes = []  # (gradients on, autocast dtype or None) per forward of the fine-tuning module
    real_forward = finetune.FineTuneModule.forward

    def spy(self, x):
        passes.append((torch.is_grad_enabled(),
                       torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return real_forward(self, x)

    monkeypatch.setattr(finetune.FineTuneModule, "forward", spy)
    r = transferlab.train(tiny_data, out=str(tmp_path / "run"), **TINY)
    training = {dtype for grad, dtype in passes if grad}
    validation = {dtype for grad, dtype in passes if not grad}
    assert training == {None} and validation == {torch.bfloat16}
    assert r.summary["precision"] == {"features": "bf16-mixed", "training": "32-true"}
