"""Resource limits: a batch that does not fit in memory is halved (and logged), and the run goes on.

Out-of-memory is simulated where it would really come from: the model's forward raises
torch.cuda.OutOfMemoryError when given more than N images. The CPU guard (--max-memory) is real.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, make_image_folder
from guarantees import TINY_FLAGS, cli, read_metrics

import transferlab
from transferlab.config import parse_size
from transferlab.training.memory import AdaptiveBatch, OutOfMemory

# dropout off and BatchNorm statistics frozen: then splitting a batch changes nothing but float rounding
EXACT = {**TINY, "head_dropout": 0.0, "bn": "eval", "epochs_frozen": 1}


@pytest.fixture
def oom_above(monkeypatch):
    """Make the classifier raise CUDA's out-of-memory error for batches larger than `limit`."""
    seen: list[int] = []
    handles = []

    def install(limit: int) -> list[int]:
        def hook(module, args):
            if getattr(module, "backbone_spec", None) is not None:  # the whole network, not its layers
                seen.append(len(args[0]))
                if len(args[0]) > limit:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        handles.append(torch.nn.modules.module.register_module_forward_pre_hook(hook))
        return seen

    yield install
    for h in handles:
        h.remove()


def test_out_of_memory_halves_the_batch_logs_it_and_the_run_matches_an_unsplit_one(tmp_path, oom_above):
    data = make_image_folder(tmp_path / "data")
    plain = transferlab.train(data, out=str(tmp_path / "plain"), feature_cache="memory", **EXACT)
    seen = oom_above(4)
    split = transferlab.train(data, out=str(tmp_path / "split"), feature_cache="memory", **EXACT)

    log = (split.run_dir / "train.log").read_text()
    for line in ("feature extraction: out of memory with 24 images per pass; continuing with batches of 12",
                 "feature extraction: out of memory with 6 images per pass; continuing with batches of 3",
                 "fine-tuning: out of memory with 8 images per pass; continuing with batches of 4",
                 "validation: out of memory with 12 images per pass; continuing with batches of 6",
                 # the val evaluation that fits the temperature after training
                 "evaluation: out of memory with 12 images per pass; continuing with batches of 6"):
        assert line in log
    # every too-large pass failed once and was logged; after that the smaller size was kept
    assert sum(n > 4 for n in seen) == log.count("out of memory with")

    # the same epochs, steps and schedule: the halves' gradients were accumulated into one step
    a, b = read_metrics(plain.run_dir), read_metrics(split.run_dir)
    assert [(r["phase"], r["epoch"], r["lr"]) for r in a] == [(r["phase"], r["epoch"], r["lr"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["val_accuracy"] == rb["val_accuracy"]
        for key in ("train_loss", "val_loss"):
            assert math.isclose(float(ra[key]), float(rb[key]), rel_tol=1e-3), (key, ra, rb)
    assert split.val_accuracy_best >= 0.9


def test_max_memory_guard_halves_batches_on_cpu(tmp_path):
    # test_efficientnet at 32 px keeps ~335 kB of fp32 activations per image: 1M fits 3 images
    # (features are extracted in bf16 where the CPU has it: half that, so only the first split is fixed)
    data = make_image_folder(tmp_path / "data")
    r = cli("train", data, *TINY_FLAGS, "--epochs-frozen", "1", "--epochs-finetune", "1", "--max-memory", "1M",
            "--out", tmp_path / "run")
    assert r.code == 0, r.err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "feature extraction: out of memory with 24 images per pass; continuing with batches of 12" in log
    assert "fine-tuning: out of memory with 8 images per pass; continuing with batches of 4" in log
    assert "fine-tuning: out of memory with 4 images per pass; continuing with batches of 2" in log
    assert "this pass needs more than --max-memory 1M" not in r.err  # handled, not shown as an error
    rows = read_metrics(tmp_path / "run")
    assert [x["phase"] for x in rows] == ["frozen", "finetune"]
    assert float(rows[-1]["val_accuracy"]) >= 0.9


def test_memory_limit_below_one_image_is_a_clear_error(tmp_path):
    data = make_image_folder(tmp_path / "data")
    r = cli("train", data, *TINY_FLAGS, "--max-memory", "100K", "--out", tmp_path / "run")
    assert r.code == 2 and "Traceback" not in r.text
    assert "feature extraction: out of memory with 1 image(s) per pass" in r.text
    assert "--max-memory" in r.text


def test_invalid_max_memory_is_rejected_before_work(tmp_path):
    r = cli("train", make_image_folder(tmp_path / "data"), *TINY_FLAGS, "--max-memory", "lots", "--out", tmp_path / "r")
    assert r.code == 2 and "max_memory 'lots' is not a size such as 8G" in r.text


@pytest.mark.parametrize("text, expected", [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5GB", int(1.5 * 2**30)),
                                            ("800MiB", 800 * 2**20), ("4096", 4096), (None, None)])
def test_memory_sizes_parse_in_binary_units(text, expected):
    assert parse_size(text) == expected


def test_only_out_of_memory_errors_are_retried():
    calls = []

    def step(start, stop):
        calls.append((start, stop))
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        AdaptiveBatch("x").run(8, step, reset=lambda: None)
    assert calls == [(0, 8)]


def test_out_of_memory_redoes_the_whole_batch_from_reset():
    """A pass that failed half-way may have left partial gradients: nothing of the batch is kept."""
    done, resets = [], []

    def step(start, stop):
        if stop - start > 2 and start >= 4:  # the second pass of 4 runs out of memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        done.append((start, stop))

    batch = AdaptiveBatch("x")
    batch.size = 4
    batch.run(8, step, reset=lambda: (resets.append(1), done.clear()))
    assert done == [(0, 2), (2, 4), (4, 6), (6, 8)] and len(resets) == 1 and batch.size == 2
    with pytest.raises(OutOfMemory, match="out of memory with 1 image"):
        AdaptiveBatch("x").run(1, lambda a, b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory.")),
                               reset=lambda: None)
