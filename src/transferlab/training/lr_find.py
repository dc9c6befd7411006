"""LR range test (Smith 2017, as fastai's `lr_find` and Lightning's `Tuner.lr_find`) for a plain PyTorch loop.

Lightning's finder cannot be reused here: it only runs inside `Trainer.fit` on a LightningModule and
restores through a checkpoint on disk, so this is a small self-contained version of the same maths —
an exponential LR schedule, fastai/Lightning's bias-corrected EMA of the loss (beta 0.98), a stop once
it exceeds `diverge` × its best — with fastai's suggestion rules (valley, steep, minimum/10), applied
like fastai's `lr_find` to the curve less its first num_steps//10 and last 5 points.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SKIP_END = 5
"""Points dropped from the end of the curve before a rule sees it (fastai's `lr_find`): the last few
are where the loss turns up towards divergence, and a rule reading them would pick an LR that blows up."""


@dataclass
class LRFindResult:
    """The outcome of `lr_range_test`: the curve, what it suggests, and why it stopped (if early).

    Every recorded point is finite: a step whose loss is NaN/inf ends the test without being recorded.
    """

    lrs: list[float]
    """The first (body) param group's LR at each step; the others ran at their entry ratio to it."""
    losses: list[float]
    """Bias-corrected EMA of the training loss at each step (what the rules read)."""
    raw_losses: list[float]
    """The loss `step()` returned at each step."""
    suggestion: float | None
    """The body group's suggested LR; None when the curve is too short or never goes down."""
    method: str
    """The rule in SUGGESTIONS that gave `suggestion`."""
    stopped: str | None
    """None (ran all steps), 'diverged' (smoothed loss > diverge × best) or 'non-finite'."""
    setup: dict[str, Any] = field(default_factory=dict)
    """What was tested, where a caller records it (`transferlab lr-find`: backbone, stages, images...)."""
    files: dict[str, str] = field(default_factory=dict)
    """Where the caller wrote the result (`transferlab lr-find`: {"plot", "json"})."""

    def to_dict(self) -> dict:
        """JSON-safe: non-finite floats become None, since strict JSON has no NaN/inf."""
        def clean(v):
            return v if v is None or math.isfinite(v) else None

        d = asdict(self)
        for key in ("lrs", "losses", "raw_losses"):
            d[key] = [clean(float(v)) for v in d[key]]
        d["suggestion"] = None if self.suggestion is None else clean(float(self.suggestion))
        return d


def _check_curve(lrs: Sequence[float], losses: Sequence[float]) -> None:
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses differ in length ({len(lrs)} vs {len(losses)}).")
    if any(lr <= 0 for lr in lrs) or any(b <= a for a, b in zip(lrs, lrs[1:])):
        raise ValueError("lrs must be positive and strictly increasing (an LR range test's schedule).")


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's `valley`: the LR part-way along the longest strictly decreasing run of the loss.

    Matches fastai's code, including its arithmetic: the valley ends at the last point of the longest
    strictly decreasing subsequence, starts that subsequence's length before it, and the pick is
    start + int(len/3) + int(len/6) — about halfway, not the "2/3" fastai's prose says. One change:
    fastai can compute index -1 there (wrapping to the last, highest LR); it is clamped to 0 here.
    """
    _check_curve(lrs, losses)
    n = len(losses)
    lds = [1] * n  # lds[i]: length of the longest strictly decreasing subsequence ending at i
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - lds[max_end]
    if n < 2 or lds[max_end] < 2:
        return None  # the loss never goes down, so there is no valley to be in
    sections = (max_end - max_start) / 3
    idx = max(0, max_start + int(sections) + int(sections / 2))
    return float(lrs[idx])


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's `steep`: the LR where the loss falls fastest per unit of log LR (forward differences).

    Lightning's `suggestion()` instead takes central differences against the LR itself, which on a
    log-spaced schedule weighs the large LRs' intervals far more; the log axis is the one plotted.
    """
    _check_curve(lrs, losses)
    if len(losses) < 2:
        return None
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    best = min(range(len(slopes)), key=slopes.__getitem__)
    return float(lrs[best]) if slopes[best] < 0 else None  # no falling segment, no steepest fall


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's `minimum`: a tenth of the LR at the lowest loss (the first one on ties)."""
    _check_curve(lrs, losses)
    if len(losses) < 2:
        return None
    best = min(range(len(losses)), key=losses.__getitem__)
    return float(lrs[best]) / 10 if losses[best] < losses[0] else None  # never below the start: nothing learnt


SuggestionRule = Callable[[Sequence[float], Sequence[float]], float | None]

SUGGESTIONS: dict[str, SuggestionRule] = {"valley": valley, "steep": steep, "minimum": minimum}
"""(lrs, smoothed losses) -> suggested LR or None; `lr_range_test(method=...)` picks one by name."""


def _rule(method: str) -> SuggestionRule:
    try:
        return SUGGESTIONS[method]
    except KeyError:
        raise ValueError(f"Unknown LR suggestion method {method!r}; valid: {', '.join(SUGGESTIONS)}.") from None


def suggest(lrs: Sequence[float], losses: Sequence[float], method: str = "valley", *,
            skip_begin: int = 10, skip_end: int = SKIP_END) -> float | None:
    """Apply rule `method` to the curve cut at its first non-finite loss, less its first `skip_begin`
    and last `skip_end` points (fastai's `lr_find` trims so for every rule)."""
    rule = _rule(method)
    _check_curve(lrs, losses)
    # cutting before trimming drops the run-up to a blow-up too (fastai trims first, then cuts)
    n = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    keep = slice(skip_begin, max(skip_begin, n - skip_end))
    return rule(list(lrs)[keep], list(losses)[keep])


def _set_lr(group: dict, lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)  # a tensor LR (capturable/compiled optimizers) must keep its identity
    else:
        group["lr"] = lr


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], torch.Tensor],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    method: str = "valley",
) -> LRFindResult:
    """Train for up to `num_steps` steps with the first param group's LR growing exponentially from
    `start_lr` to `end_lr` (the others at their entry ratio to it), recording the loss; suggest an LR.

    `step()` returns the (scalar) loss of one fresh mini-batch; zero_grad/backward/optimizer.step are
    done here. Step i runs at start_lr·(end_lr/start_lr)^(i/(num_steps-1)), so both ends are tried.
    The test stops once the smoothed loss exceeds `diverge` × its best so far (math.inf: never), or at
    a non-finite loss. On exit, also by an exception, the model's and the optimizer's state dicts
    (group LRs included), the gradients, every module's train/eval flag and torch's RNG state are put
    back, so the caller trains on exactly as if the test had not run. The state is copied in memory
    (about 3× the parameters with AdamW): this is meant for small models.

    The suggestion is the body group's LR; give the other groups their usual multiple of it.
    """
    _rule(method)  # before any training, so a typo costs nothing
    if not 0 < start_lr < end_lr:
        raise ValueError(f"Need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}.")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}.")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}.")
    if not diverge > 1:
        raise ValueError(f"diverge must be > 1 (a multiple of the best loss), got {diverge}.")
    params = list(model.parameters())
    model_ids = {id(p) for p in params}
    if any(id(p) not in model_ids for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("The optimizer holds parameters outside `model`; they would not be restored.")
    body_lr = float(optimizer.param_groups[0]["lr"])
    if not body_lr > 0:
        raise ValueError(f"The first param group's LR must be > 0 (the others keep their ratio to it), got {body_lr}.")
    ratios = [float(g["lr"]) / body_lr for g in optimizer.param_groups]

    model_state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                   for k, v in model.state_dict().items()}
    optim_state = copy.deepcopy(optimizer.state_dict())  # a plain state_dict() aliases the live moment tensors
    groups = optimizer.param_groups
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index for p in params if p.device.type == "cuda"})

    lrs: list[float] = []
    losses: list[float] = []
    raw_losses: list[float] = []
    stopped: str | None = None
    try:
        with torch.random.fork_rng(devices=cuda):
            if not model.training:
                # a range test is training; a model already in train mode keeps its submodules' modes
                # (e.g. BatchNorm frozen in eval), as the caller's own loop would run it
                model.train()
            avg = 0.0
            best = math.inf
            for i in range(num_steps):
                lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
                for group, ratio in zip(optimizer.param_groups, ratios):
                    _set_lr(group, lr * ratio)
                optimizer.zero_grad(set_to_none=True)
                loss = step()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError("step() must return the mini-batch's loss as a one-element tensor.")
                raw = float(loss.detach())
                avg = beta * avg + (1 - beta) * raw if math.isfinite(raw) else math.nan
                smoothed = avg / (1 - beta ** (i + 1))  # bias correction: the EMA starts at 0, not at the loss
                if not math.isfinite(smoothed):
                    stopped = "non-finite"  # backward through NaN/inf would only poison the weights
                    break
                best = min(best, smoothed)
                lrs.append(lr)
                raw_losses.append(raw)
                losses.append(smoothed)
                if smoothed > diverge * best:
                    stopped = "diverged"  # recorded, like fastai and Lightning, so the plot shows the turn
                    break
                loss.backward()
                optimizer.step()
    finally:
        model.load_state_dict(model_state)  # copies into the live tensors, so references stay valid
        optimizer.load_state_dict(optim_state)
        for group, restored in zip(groups, optimizer.param_groups):
            group.clear()
            group.update(restored)  # the caller's group dicts (and a scheduler's view of them) stay the live ones
        optimizer.param_groups = groups
        for p, g in zip(params, grads):
            p.grad = g
        for m, mode in modes:
            m.training = mode

    # at least one point off each end, so the suggestion lies strictly inside (start_lr, end_lr)
    suggestion = suggest(lrs, losses, method, skip_begin=max(1, num_steps // 10))
    return LRFindResult(lrs=lrs, losses=losses, raw_losses=raw_losses, suggestion=suggestion, method=method,
                          stopped=stopped)


def plot_lr_find(result: LRFindResult, path: str | Path) -> Path:
    """Smoothed loss against LR (log axis), raw loss faint behind it, the suggestion marked; a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a bare Figure on an Agg canvas: no display needed, and pyplot's global figures are left alone
    fig = Figure(figsize=(6, 4), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.raw_losses, color="grey", alpha=0.35, linewidth=1, label="loss")
    ax.plot(result.lrs, result.losses, label="smoothed loss")
    if result.suggestion is not None and result.lrs:
        y = _loss_at(result, result.suggestion)
        ax.plot([result.suggestion], [y], "o", color="red", label=f"{result.method}: {result.suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (body group)")
    ax.set_ylabel("training loss")
    title = "LR range test" + (f" (stopped: {result.stopped})" if result.stopped else "")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # written whole or not at all, as the other report plots
    return path


def _loss_at(result: LRFindResult, lr: float) -> float:
    """The smoothed loss at the recorded LR nearest `lr` in log space (minimum's lr/10 may lie off the curve)."""
    i = min(range(len(result.lrs)), key=lambda k: abs(math.log(result.lrs[k]) - math.log(lr)))
    return result.losses[i]
