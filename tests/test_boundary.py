"""Partial fine-tuning on a boundary cache (training/boundary.py) — the default two-stage fine-tuning."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import TINY
from torch import nn

import transferlab
from transferlab.config import DEFAULT_EARLY_STOP, DEFAULT_LR_FINETUNE, TrainConfig
from transferlab.errors import TransferlabError
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone
from transferlab.training import boundary
from transferlab.training.finetune import build_scheduler

BOUNDARY = {**TINY, "finetune": "boundary", "epochs_finetune": 3, "boundary_views": 2, "finetune_when": "always"}


def _tiny_model(name: str = "test_efficientnet", classes: int = 3) -> nn.Module:
    return build_classifier(resolve_backbone(name, pretrained=False, img_size=32), classes, HeadConfig())


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_split_reproduces_the_model_and_shares_its_modules(stages):
    model = _tiny_model().eval()
    split = boundary.split_model(model, stages)
    assert split is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(split.top(split.bottom(x)), model(x), atol=1e-5)
    trained = {id(p) for p in split.top.parameters()}
    assert trained <= {id(p) for p in model.parameters()}  # training the top trains the model
    assert not trained & {id(p) for p in split.bottom.parameters()}
    assert split.cut == len(model.blocks) - stages


def test_split_refuses_what_it_cannot_cut():
    model = _tiny_model()
    assert boundary.split_model(model, len(model.blocks) + 1) is None
    assert boundary.split_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 1) is None
    # a chain whose output is not the model's (a forward that does more than the chain) is refused
    model.forward_head = lambda x, pre_logits=False: model.classifier(model.global_pool(x)) * 2
    assert boundary.split_model(model, 1) is None


def test_views_fit_the_cache_budget():
    assert boundary.views_that_fit(4, n_train=100, n_val=50, per_image_bytes=10, budget=10_000) == 4
    assert boundary.views_that_fit(4, n_train=100, n_val=50, per_image_bytes=10, budget=3_600) == 2
    assert boundary.views_that_fit(4, n_train=100, n_val=50, per_image_bytes=10, budget=1_600) == 0  # plain + val only
    assert boundary.views_that_fit(4, n_train=100, n_val=50, per_image_bytes=10, budget=1_400) is None


def test_train_top_keeps_its_best_epoch_and_only_if_it_beats_the_baseline():
    torch.manual_seed(0)
    top = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    y = torch.arange(64) % 2
    views = [torch.randn(64, 4, 3, 3) + y[:, None, None, None] * 2.0 for _ in range(2)]
    val_x, val_y = torch.randn(32, 4, 3, 3) + (torch.arange(32) % 2)[:, None, None, None] * 2.0, torch.arange(32) % 2
    kw = dict(epochs=4, lr=1e-2, head_lr=1e-2, weight_decay=0.0, label_smoothing=0.0, batch_size=16, seed=0)
    bn_before = top[1].running_mean.clone()
    records, best, stopped = boundary.train_top(top, views, y, val_x, val_y, baseline=(0.0, -10.0), **kw)
    assert len(records) == 4 and stopped is None and best is not None
    assert max(r["val_accuracy"] for r in records) > 0.9
    assert torch.equal(top[1].running_mean, bn_before)  # BatchNorm statistics stay pretrained
    # a baseline no epoch can beat: nothing to keep
    _, best, _ = boundary.train_top(top, views, y, val_x, val_y, baseline=(2.0, 0.0), **kw)
    assert best is None
    # the gate stops after its epoch when nothing beat the baseline
    records, best, stopped = boundary.train_top(top, views, y, val_x, val_y, baseline=(2.0, 0.0), gate_epochs=1, **kw)
    assert len(records) == 1 and stopped == "gate"


def test_train_top_with_dropout_does_not_depend_on_what_drew_random_numbers_before():
    # a warm feature cache and a cold one leave torch's global stream in different states (each DataLoader
    # takes a seed from it): the same seed must still train the same top
    y = torch.arange(64) % 2
    views = [torch.randn(64, 4, 3, 3, generator=torch.Generator().manual_seed(1)) + y[:, None, None, None]]
    val_x, val_y = views[0][:32].clone(), y[:32]
    kw = dict(epochs=2, lr=1e-2, head_lr=1e-2, weight_decay=0.0, label_smoothing=0.0, batch_size=16, seed=3)

    def trained(draws_before: int) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        top = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                            nn.Linear(8, 2))
        torch.rand(draws_before)  # what ran before the stage
        records, _, _ = boundary.train_top(top, views, y, val_x, val_y, baseline=(-1.0, -10.0), **kw)
        return [r["train_loss"] for r in records], top[-1].weight.detach().clone()

    (losses_a, weight_a), (losses_b, weight_b) = trained(0), trained(5)
    assert losses_a == losses_b and torch.equal(weight_a, weight_b)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_one_cycle_over_very_few_steps_does_not_divide_by_zero(steps):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler("onecycle", opt, steps)
    for _ in range(steps):
        opt.step()
        sched.step()


def test_finetune_mode_and_its_learning_rate_are_checked_and_defaulted():
    with pytest.raises(TransferlabError, match="finetune 'partial'"):
        TrainConfig(data="x", finetune="partial").validate()
    with pytest.raises(TransferlabError, match="boundary_stages"):
        TrainConfig(data="x", boundary_stages=0).validate()
    with pytest.raises(TransferlabError, match="finetune_when 'sometimes'"):
        TrainConfig(data="x", finetune_when="sometimes").validate()
    assert TrainConfig().finetune_when == "underfit" and TrainConfig().boundary_views == 0 and TrainConfig().epochs_finetune == 4
    assert TrainConfig().finetune == "boundary"
    assert TrainConfig().finetune_lr == DEFAULT_LR_FINETUNE["boundary"]
    assert TrainConfig(finetune="full").finetune_lr == DEFAULT_LR_FINETUNE["full"]
    assert TrainConfig(finetune="full", lr_finetune=3e-4).finetune_lr == 3e-4


def test_boundary_run_fine_tunes_the_top_and_saves_a_model_that_evaluates_as_validated(tiny_data, tmp_path):
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**BOUNDARY, "lr_finetune": 3e-3})
    run = result.run_dir
    s = result.summary
    assert s["finetune"]["mode"] == "boundary" and s["finetune"]["views"] == 2
    assert s["finetune"]["from_feature_pass"] is True
    assert s["finetune"]["epochs_run"] == 3
    assert {"boundary_cache", "finetune"} <= set(s["phase_seconds"])
    phases = [r["phase"] for r in result.rows]
    assert phases == ["frozen"] * 3 + ["finetune"] * 3
    state = json.loads((run / "state.json").read_text())
    assert state["boundary_done"] and state["status"] == "finished"
    # the saved best model, re-run through the whole network by evaluate, scores what validation said
    ev = transferlab.evaluate(run, split="val", progress=False)
    assert ev.metrics["accuracy"] == pytest.approx(s["val_accuracy_best"], abs=1e-6)
    # discarded work is accounted: all of it when the head stayed best, else the epochs after the best
    ft = s["finetune"]
    if s["best"]["phase"] == "frozen":
        assert ft["discarded_seconds"] == pytest.approx(ft["seconds"], abs=1e-3)
    else:
        assert ft["best_epoch"] == s["best"]["epoch"] and ft["discarded_seconds"] <= ft["seconds"]


def test_boundary_stage_moves_only_the_top_stages(tiny_data, tmp_path):
    from transferlab.io import load_tensors

    run = transferlab.train(tiny_data, out=str(tmp_path / "run"),
                            **{**BOUNDARY, "boundary_stages": 1, "lr_finetune": 5e-2}).run_dir
    frozen = load_tensors(run / "checkpoints" / "stage1.safetensors")
    state = json.loads((run / "state.json").read_text())
    if state["best"]["phase"] != "finetune":
        pytest.skip("the head stayed best on this tiny data; nothing to compare")
    best = load_tensors(run / "model.safetensors")
    last_stage = f"blocks.{len({k.split('.')[1] for k in best if k.startswith('blocks.')}) - 1}."
    moved = {k for k in best if not torch.equal(best[k], frozen[k])}
    assert moved and all(k.startswith((last_stage, "conv_head", "bn2", "classifier")) for k in moved)


def test_same_seed_boundary_runs_are_identical(tiny_data, tmp_path):
    a = transferlab.train(tiny_data, out=str(tmp_path / "a"), **BOUNDARY)
    b = transferlab.train(tiny_data, out=str(tmp_path / "b"), **BOUNDARY)
    key = ["phase", "epoch", "train_loss", "val_loss", "val_accuracy"]
    assert [[r[k] for k in key] for r in a.rows] == [[r[k] for k in key] for r in b.rows]


def test_activations_over_the_budget_fall_back_to_the_full_loop(tiny_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(boundary, "CACHE_BUDGET_BYTES", 1)
    with caplog.at_level("INFO", logger="transferlab"):
        result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **BOUNDARY)
    assert "exceed" in caplog.text
    assert result.summary["finetune"] == {"mode": "full", "lr": 1e-3, "lr_source": "default"}  # the boundary default
    assert [r["phase"] for r in result.rows].count("finetune") == 3


def test_an_interrupted_boundary_stage_is_redone_whole_on_resume(tiny_data, tmp_path, monkeypatch):
    full = transferlab.train(tiny_data, out=str(tmp_path / "full"), **BOUNDARY)
    calls = {"n": 0}
    real = boundary.train_top

    def interrupted(*a, **k):
        on_epoch = k["on_epoch"]

        def stop_after_first(rec, improved):
            on_epoch(rec, improved)
            raise KeyboardInterrupt

        calls["n"] += 1
        return real(*a, **{**k, "on_epoch": stop_after_first})

    monkeypatch.setattr(boundary, "train_top", interrupted)
    with pytest.raises(KeyboardInterrupt):
        transferlab.train(tiny_data, out=str(tmp_path / "run"), **BOUNDARY)
    monkeypatch.setattr(boundary, "train_top", real)
    resumed = transferlab.train(resume=tmp_path / "run")
    key = ["phase", "epoch", "train_loss", "val_loss", "val_accuracy"]
    assert [[r[k] for k in key] for r in resumed.rows] == [[r[k] for k in key] for r in full.rows]
    assert resumed.summary["best"] == full.summary["best"]
    # the first run read the plain view and val from its feature pass, the resumed one ran the bottom
    # again: the rows above being equal pins that both give the same activations
    assert full.summary["finetune"]["from_feature_pass"] is True
    assert resumed.summary["finetune"]["from_feature_pass"] is False


def test_head_underfits_compares_the_heads_train_error_with_its_val_error():
    assert boundary.head_underfits(0.938, 0.907)  # sign_digits' head: train error 6.2 % of val's 9.3 %
    assert boundary.head_underfits(0.985, 0.986)  # potato_leaf: train error above val's
    assert not boundary.head_underfits(0.989, 0.943)  # scene15: 1.1 % against 5.7 %
    assert not boundary.head_underfits(0.9, 1.0)  # nothing left to gain on val
    assert not boundary.head_underfits(1.0, 0.95)


@pytest.mark.parametrize("underfits", [False, True])
def test_finetune_when_underfit_runs_the_boundary_stage_only_for_an_underfitting_head(tiny_data, tmp_path,
                                                                                      monkeypatch, underfits):
    seen = []

    def rule(train_accuracy, val_accuracy):
        seen.append((train_accuracy, val_accuracy))
        return underfits

    monkeypatch.setattr(boundary, "head_underfits", rule)
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**BOUNDARY, "finetune_when": "underfit"})
    s = result.summary
    frozen = [r for r in result.rows if r["phase"] == "frozen"]
    head = max(frozen, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert seen == [(head["train_accuracy"], head["val_accuracy"])]  # the head the run kept decides
    assert s["finetune"]["head_train_error"] == pytest.approx(1 - head["train_accuracy"], abs=1e-4)
    if underfits:
        assert s["finetune"]["epochs_run"] == 3 and "skipped" not in s["finetune"]
    else:
        assert s["finetune"]["skipped"] == "head not underfitting" and s["finetune"]["discarded_seconds"] == 0
        assert [r["phase"] for r in result.rows] == ["frozen"] * 3 and s["best"]["phase"] == "frozen"
        assert "boundary_cache" not in s["phase_seconds"]
        resumed = transferlab.train(resume=result.run_dir)  # a finished, skipped stage is not run on resume
        assert [r["phase"] for r in resumed.rows] == ["frozen"] * 3


def _scripted_top(monkeypatch, script):
    """A top whose val evaluations return `script`'s (loss, accuracy) pairs in order."""
    evals = iter(script)
    monkeypatch.setattr(boundary, "evaluate_top", lambda *a, **k: next(evals))
    top = nn.Sequential(nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    y = torch.arange(16) % 2
    return top, [torch.randn(16, 4, 3, 3)], y, torch.randn(8, 4, 3, 3), torch.arange(8) % 2


@pytest.mark.parametrize("script, patience, epochs_run, best_epoch", [
    # beats the head (0.8, loss 0.5) at epoch 2; epoch 3 ties its accuracy with a higher loss: stop there
    ([(0.9, 0.70), (0.4, 0.90), (0.5, 0.90), (0.45, 0.90)], 1, 3, 2),
    ([(0.9, 0.70), (0.4, 0.90), (0.5, 0.90), (0.45, 0.90)], 0, 4, 2),  # 0: every epoch runs
    ([(0.9, 0.70), (0.4, 0.90), (0.5, 0.90), (0.6, 0.88)], 2, 4, 2),  # patience 2: two such epochs in a row
    # the dip before any epoch beats the head does not count (its loss rises from epoch 1 to 2)
    ([(0.6, 0.75), (0.7, 0.78), (0.4, 0.90), (0.3, 0.92)], 1, 4, 4),
    # an epoch below the best whose loss still falls is still learning: it resets the count
    ([(0.4, 0.90), (0.35, 0.89), (0.3, 0.88), (0.28, 0.91)], 1, 4, 4),
])
def test_boundary_early_stop_counts_epochs_after_the_best_that_lower_no_loss(monkeypatch, script, patience,
                                                                             epochs_run, best_epoch):
    top, views, y, val_x, val_y = _scripted_top(monkeypatch, script)
    kept = []
    records, best, stopped = boundary.train_top(
        top, views, y, val_x, val_y, epochs=4, lr=1e-3, head_lr=1e-3, weight_decay=0.0, label_smoothing=0.0,
        batch_size=8, seed=0, baseline=(0.8, -0.5), patience=patience,
        on_epoch=lambda rec, improved: improved and kept.append(rec["epoch"]))
    assert len(records) == epochs_run and kept[-1] == best_epoch and best is not None
    assert stopped == ("early stop" if epochs_run < 4 else None)


def test_early_stop_defaults_by_finetune_mode_and_is_checked():
    assert TrainConfig().finetune_patience == DEFAULT_EARLY_STOP["boundary"] == 1
    assert TrainConfig(finetune="full").finetune_patience == DEFAULT_EARLY_STOP["full"] == 3
    assert TrainConfig(early_stop=0).finetune_patience == 0 and TrainConfig(early_stop=5).finetune_patience == 5
    with pytest.raises(TransferlabError, match="early_stop must be >= 0"):
        TrainConfig(data="x", early_stop=-1).validate()


def test_a_boundary_run_stops_early_and_says_so(tiny_data, tmp_path, monkeypatch, caplog):
    # Val evaluations of the top, scripted: epoch 1 beats any head (accuracy 1.0), epoch 2 ties it with a
    # higher loss; the run stops there, keeps epoch 1 and counts epoch 2 as thrown away.
    script = iter([(0.01, 1.0), (0.02, 1.0), (0.03, 1.0)])
    monkeypatch.setattr(boundary, "evaluate_top", lambda *a, **k: next(script))
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**BOUNDARY, "early_stop": None})
    ft = result.summary["finetune"]
    assert ft["stopped"] == "early stop" and ft["epochs_run"] == 2 and ft["best_epoch"] == 1
    epoch2 = [r for r in result.rows if r["phase"] == "finetune"][1]
    assert 0 < ft["discarded_seconds"] == pytest.approx(epoch2["epoch_seconds"], abs=1e-3)
    assert "early stop: fine-tuning epoch 1 was the best" in caplog.text


@pytest.mark.parametrize("budget, fits", [("1h", True), ("2s", False)])
def test_a_time_budget_plans_the_boundary_epochs_from_the_tops_measured_speed(tiny_data, tmp_path, monkeypatch,
                                                                              budget, fits):
    from transferlab.training import run as run_mod

    if not fits:  # the budget is spent by the time the activations are cached: not one epoch fits
        real = run_mod._plan_boundary_epochs

        def late(top, val_x, n_train, requested, deadline, autocast, state):
            return real(top, val_x, n_train, requested, time.perf_counter() + 1e-6, autocast, state)

        monkeypatch.setattr(run_mod, "_plan_boundary_epochs", late)
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), time_budget=budget, **BOUNDARY)
    plan, ft = result.summary["time_budget"], result.summary["finetune"]
    assert plan["estimated_epoch_seconds"] > 0 and plan["seconds"] == (3600 if fits else 2)
    if fits:
        assert plan["planned_finetune_epochs"] == ft["epochs_run"] == BOUNDARY["epochs_finetune"]
    else:
        assert plan["planned_finetune_epochs"] == 0 and ft["skipped"] == "time budget"
        assert [r["phase"] for r in result.rows] == ["frozen"] * 3 and result.summary["best"]["phase"] == "frozen"
