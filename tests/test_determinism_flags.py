"""Fine-tuning runs in torch's deterministic mode on CPU without its NaN fill, and hands the caller's
process back with the determinism flags it had (Lightning's Trainer would leave them switched on)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.utils.deterministic
from conftest import TINY

import transferlab
from transferlab.training import run as run_module


@pytest.fixture
def restore_flags():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]


@pytest.mark.parametrize("before", [(False, False, True), (True, True, True), (True, False, False)])
def test_train_leaves_the_callers_determinism_flags_as_they_were(tiny_data, tmp_path, restore_flags, before):
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **TINY)
    assert any(r["phase"] == "finetune" for r in result.rows)  # Lightning's Trainer did run
    after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    assert after == before


def test_cpu_fine_tuning_is_deterministic_without_the_uninitialized_memory_fill(tiny_data, tmp_path, monkeypatch,
                                                                                restore_flags):
    seen = []
    original = run_module._RunCallback.on_train_epoch_end

    def spy(self, trainer, pl_module):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory))
        return original(self, trainer, pl_module)

    monkeypatch.setattr(run_module._RunCallback, "on_train_epoch_end", spy)
    transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "device": "cpu"})
    assert seen and all(s == (True, False) for s in seen)


@pytest.mark.parametrize("cublas_before", [None, ":16:8"])
def test_train_gives_back_cudnn_autotuning_and_the_cublas_setting(tiny_data, tmp_path, monkeypatch, restore_flags,
                                                                 cublas_before):
    if cublas_before is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", cublas_before)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []
    original = run_module._RunCallback.on_train_epoch_end

    def spy(self, trainer, pl_module):
        seen.append((torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return original(self, trainer, pl_module)

    monkeypatch.setattr(run_module._RunCallback, "on_train_epoch_end", spy)
    transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "device": "cpu"})
    assert seen and seen[0] == (False, ":4096:8")  # what Lightning's deterministic mode set inside
    assert torch.backends.cudnn.benchmark is True
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == cublas_before
