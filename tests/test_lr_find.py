"""LR range test (training/lr_find.py): the curve, the suggestion rules, and that nothing leaks out of it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.training.lr_find import (
    SKIP_END,
    SUGGESTIONS,
    LRFindResult,
    lr_range_test,
    minimum,
    plot_lr_find,
    steep,
    suggest,
    valley,
)

D, K = 8, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second intra-op thread only adds contention (10x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(seed: int = 0, n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g) * 2.0
    y = torch.randint(K, (n,), generator=g)
    return centres[y] + torch.randn(n, D, generator=g), y


X, Y = _blobs()


def _model(seed: int = 0, norm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    if norm:  # buffers (BatchNorm) and RNG use (Dropout) for the restore tests
        return nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, K))
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K))


def _optimizer(model: nn.Sequential, lr: float) -> torch.optim.Optimizer:
    """The caller's setup: AdamW, body at lr and head at 3×lr."""
    body = [p for m in list(model)[:-1] for p in m.parameters()]
    return torch.optim.AdamW([{"params": body, "lr": lr}, {"params": model[-1].parameters(), "lr": 3 * lr}],
                             weight_decay=0.01)


def _stepper(model: nn.Module, seed: int | None = 1, batch: int = 32):
    """One fresh mini-batch per call; seed=None draws from torch's global RNG (for the RNG-restore test)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None

    def step() -> torch.Tensor:
        idx = torch.randint(len(X), (batch,), generator=g)
        return F.cross_entropy(model(X[idx]), Y[idx])

    return step


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, step, steps: int, scheduler=None) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(X), Y).item()


def _assert_same(a, b, where: str = "") -> None:
    """Exact, recursive equality of state dicts (tensors by value, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": copy.deepcopy(optimizer.state_dict()),
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _assert_restored(model, optimizer, before: dict, groups: list, params: list) -> None:
    after = _snapshot(model, optimizer)
    _assert_same(before["model"], after["model"], "model")
    _assert_same(before["optim"], after["optim"], "optimizer")
    assert after["lrs"] == before["lrs"]
    assert after["modes"] == before["modes"]
    _assert_same(before["grads"], after["grads"], "grads")
    assert all(g is h for g, h in zip(optimizer.param_groups, groups))  # the caller's group dicts stay live
    assert all(p is q for p, q in zip(model.parameters(), params))


# --- the curve and its suggestion on a real (tiny) problem ---------------------------------------------


@pytest.mark.parametrize("method", sorted(SUGGESTIONS))
def test_suggestion_trains_where_the_start_lr_does_not(method):
    model = _model()
    result = lr_range_test(model, _optimizer(model, 1e-3), _stepper(model), end_lr=10.0, method=method)
    s = result.suggestion
    assert s is not None and result.method == method
    assert 1e-7 < s < 10.0
    # AdamW on this problem: 1e-4 barely trains in 300 steps, ~1 is unstable; a good pick lies between
    assert 1e-4 < s < 0.3, s
    start, at_s = _model(), _model()
    before = _full_loss(start)
    _train(start, _optimizer(start, 1e-7), _stepper(start, seed=2), 300)
    _train(at_s, _optimizer(at_s, s), _stepper(at_s, seed=2), 300)
    assert _full_loss(start) > 0.95 * before  # 1e-7 learns nothing: the comparison has a floor
    assert _full_loss(at_s) < 0.5 * _full_loss(start), (s, _full_loss(at_s), _full_loss(start))


def test_schedule_is_exponential_on_the_body_and_keeps_the_head_ratio():
    model = _model()
    optimizer = _optimizer(model, 1e-3)
    seen: list[list[float]] = []
    inner = _stepper(model)

    def step():
        seen.append([g["lr"] for g in optimizer.param_groups])
        return inner()

    result = lr_range_test(model, optimizer, step, start_lr=1e-6, end_lr=1e-1, num_steps=50, diverge=math.inf)
    assert result.stopped is None and len(result.lrs) == len(result.losses) == len(result.raw_losses) == 50
    assert result.lrs == [body for body, _head in seen]
    assert all(head == pytest.approx(3 * body, rel=1e-12) for body, head in seen)
    assert result.lrs[0] == pytest.approx(1e-6) and result.lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9) and ratios[0] > 1


def test_smoothed_loss_is_the_bias_corrected_ema_of_the_raw_loss():
    model = _model()
    result = lr_range_test(model, _optimizer(model, 1e-3), _stepper(model), num_steps=30, beta=0.9)
    avg = 0.0
    for i, (raw, smooth) in enumerate(zip(result.raw_losses, result.losses)):
        avg = 0.9 * avg + 0.1 * raw
        assert smooth == pytest.approx(avg / (1 - 0.9 ** (i + 1)), rel=1e-12)
    assert result.losses[0] == pytest.approx(result.raw_losses[0])  # bias correction: no pull towards 0


def test_a_diverging_run_stops_at_the_first_point_past_the_threshold():
    model = _model()
    result = lr_range_test(model, _optimizer(model, 1e-3), _stepper(model), end_lr=100.0, num_steps=100)
    assert result.stopped == "diverged"
    assert len(result.lrs) < 100
    assert result.losses[-1] > 4.0 * min(result.losses)
    running = [min(result.losses[: i + 1]) for i in range(len(result.losses))]
    assert all(v <= 4.0 * b for v, b in zip(result.losses[:-1], running[:-1]))  # not a step later than needed
    assert result.suggestion is not None and result.suggestion < result.lrs[-SKIP_END]  # the blow-up is not read


def test_a_non_finite_loss_stops_without_recording_or_stepping_on_it():
    model = _model()
    optimizer = _optimizer(model, 1e-3)
    inner = _stepper(model)
    calls = []

    def step():
        calls.append(1)
        loss = inner()
        return loss * math.nan if len(calls) == 7 else loss

    result = lr_range_test(model, optimizer, step, num_steps=40)
    assert result.stopped == "non-finite" and len(calls) == 7
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) == 6
    assert all(math.isfinite(v) for v in result.losses + result.raw_losses)
    assert result.suggestion is None  # 6 points, less the ends trimmed off, leave nothing to read


# --- nothing leaks out ---------------------------------------------------------------------------------


def _warm(norm: bool = True):
    """A model part-way through training: optimizer moments, a scheduler, and grads left from a step."""
    model = _model(norm=norm)
    optimizer = _optimizer(model, 1e-3)
    _train(model, optimizer, _stepper(model, seed=5), 5)
    F.cross_entropy(model(X[:16]), Y[:16]).backward()  # leftover grads, which must come back as they were
    return model, optimizer


def test_state_lrs_grads_and_modes_are_restored_exactly():
    model, optimizer = _warm()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model: the caller's policy, kept and restored
    before, groups, params = _snapshot(model, optimizer), list(optimizer.param_groups), list(model.parameters())
    inner = _stepper(model)
    modes = []

    def step():
        modes.append((model.training, model[1].training))
        return inner()

    result = lr_range_test(model, optimizer, step, num_steps=30)
    assert len(result.lrs) == 30 and set(modes) == {(True, False)}
    _assert_restored(model, optimizer, before, groups, params)


def test_an_eval_model_is_trained_in_train_mode_and_handed_back_in_eval():
    model, optimizer = _warm()
    model.eval()
    before, groups, params = _snapshot(model, optimizer), list(optimizer.param_groups), list(model.parameters())
    inner = _stepper(model)
    modes = []

    def step():
        modes.append(all(m.training for m in model.modules()))
        return inner()

    lr_range_test(model, optimizer, step, num_steps=20)
    assert modes and all(modes)
    _assert_restored(model, optimizer, before, groups, params)


def test_state_is_restored_when_step_raises():
    model, optimizer = _warm()
    before, groups, params = _snapshot(model, optimizer), list(optimizer.param_groups), list(model.parameters())
    inner = _stepper(model)
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("data loader broke")
        return inner()

    with pytest.raises(RuntimeError, match="data loader broke"):
        lr_range_test(model, optimizer, step, num_steps=30)
    assert len(calls) == 6
    _assert_restored(model, optimizer, before, groups, params)


def test_training_after_the_test_is_bitwise_the_training_without_it():
    """Model, optimizer, scheduler-visible groups and torch's RNG all restored: the run cannot tell."""

    def run(with_test: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        model = _model(norm=True)
        optimizer = _optimizer(model, 1e-3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[1e-2, 3e-2], total_steps=30)
        step = _stepper(model, seed=None)  # batches and dropout masks from the global RNG
        _train(model, optimizer, step, 5, scheduler)
        if with_test:
            lr_range_test(model, optimizer, step, num_steps=25)
        _train(model, optimizer, step, 20, scheduler)
        return model.state_dict()

    _assert_same(run(False), run(True))


def test_optimizer_over_foreign_parameters_is_refused():
    model = _model()
    other = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": other.parameters()}], lr=1e-3)
    with pytest.raises(ValueError, match="outside"):
        lr_range_test(model, optimizer, _stepper(model))


# --- the rules on hand-made curves ---------------------------------------------------------------------


def _logspace(n: int, lo: float = 1e-5, hi: float = 1.0) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def test_valley_matches_fastai_on_a_v():
    lrs = _logspace(31)
    losses = [3.0 - 0.1 * i for i in range(21)] + [1.0 + 0.2 * i for i in range(1, 11)]
    # fastai: longest decreasing run ends at 20 with length 21, start = 20 - 21 = -1,
    # sections = 21/3 = 7, idx = -1 + int(7) + int(3.5) = 9
    assert valley(lrs, losses) == lrs[9]


def test_valley_picks_the_longest_valley_not_the_first():
    lrs = _logspace(40)
    short = [2.0, 1.9, 1.8, 1.7, 1.6]  # a short early dip, below everything after it
    long = [5.0] + [4.9 - 0.1 * i for i in range(24)]  # a bump, then a 24-step fall to 2.6
    losses = short + long + [3.0 + 0.3 * i for i in range(40 - len(short) - len(long))]
    # the run ending at 29 (value 2.6) has length 25 (from the bump): start 4, idx 4 + 8 + 4 = 16
    assert valley(lrs, losses) == lrs[16]  # inside the long fall (6..29), not the early dip


@pytest.mark.parametrize("rule", [valley, steep, minimum])
@pytest.mark.parametrize("losses", [[1.0] * 20, [1.0 + 0.01 * i for i in range(20)], [1.0]])
def test_a_curve_that_never_falls_suggests_nothing(rule, losses):
    assert rule(_logspace(len(losses)) if len(losses) > 1 else [1e-3], losses) is None


def test_steep_is_the_steepest_fall_per_log_lr_not_the_biggest_drop():
    lrs = [1e-4, 2e-4, 3e-4, 1e-3, 1e-1, 2e-1]
    losses = [2.0, 1.9, 1.6, 1.5, 0.5, 0.45]
    # slopes per unit ln(lr): -0.14, -0.74, -0.08, -0.22, -0.07; the drop of 1.0 spans two decades
    assert steep(lrs, losses) == 2e-4


def test_minimum_is_a_tenth_of_the_lowest_losss_lr_first_on_ties():
    lrs = _logspace(10)
    losses = [2.0, 1.5, 1.0, 0.5, 0.7, 0.5, 1.0, 3.0, 5.0, 9.0]
    assert minimum(lrs, losses) == pytest.approx(lrs[3] / 10)


def test_suggest_trims_the_ends_and_cuts_at_the_first_non_finite_loss():
    lrs = _logspace(40)
    losses = [2.0 - 0.02 * i for i in range(40)]
    losses[3] = 0.1  # a noise dip at the start: skipped
    assert suggest(lrs, losses, "minimum", skip_begin=10) == pytest.approx(lrs[34] / 10)  # last 5 skipped too
    assert suggest(lrs, losses, "minimum", skip_begin=0, skip_end=0) == pytest.approx(lrs[3] / 10)
    cut = list(losses)
    cut[20] = math.nan
    cut[25] = -5.0  # after the NaN: never read
    assert suggest(lrs, cut, "minimum", skip_begin=10, skip_end=0) == pytest.approx(lrs[19] / 10)
    assert suggest(lrs[:12], losses[:12], "valley", skip_begin=10) is None  # too short once trimmed


def test_unknown_method_raises_before_any_step():
    model = _model()
    calls = []

    def step():
        calls.append(1)
        return torch.tensor(1.0, requires_grad=True)

    with pytest.raises(ValueError, match="valley.*steep.*minimum"):
        lr_range_test(model, _optimizer(model, 1e-3), step, method="median")
    assert not calls
    with pytest.raises(ValueError, match="valid"):
        suggest([1e-3, 1e-2], [1.0, 0.5], "median")


def test_rules_refuse_a_curve_that_is_not_a_schedule():
    with pytest.raises(ValueError, match="increasing"):
        valley([1e-2, 1e-3], [1.0, 0.5])
    with pytest.raises(ValueError, match="length"):
        steep([1e-3, 1e-2], [1.0])


# --- output --------------------------------------------------------------------------------------------


def test_to_dict_is_strict_json():
    model = _model()
    result = lr_range_test(model, _optimizer(model, 1e-3), _stepper(model), num_steps=30)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["lrs"] == result.lrs and d["losses"] == result.losses and d["method"] == "valley"
    odd = LRFindResult(lrs=[1e-3], losses=[math.inf], raw_losses=[math.nan], suggestion=math.nan,
                       method="steep", stopped="non-finite")
    assert json.loads(json.dumps(odd.to_dict(), allow_nan=False))["losses"] == [None]


def test_plot_is_written(tmp_path):
    model = _model()
    result = lr_range_test(model, _optimizer(model, 1e-3), _stepper(model), num_steps=40)
    assert result.suggestion is not None
    out = plot_lr_find(result, tmp_path / "lr_find.png")
    assert out == tmp_path / "lr_find.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = LRFindResult(lrs=[], losses=[], raw_losses=[], suggestion=None, method="valley", stopped="non-finite")
    assert plot_lr_find(empty, tmp_path / "empty.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "lr_find.png"]  # no temp file left
