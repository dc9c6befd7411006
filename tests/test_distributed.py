"""Scale-out through Lightning: sharded samplers, distributed feature extraction, DDP equal to one process.

The DDP run is real: `python -m transferlab train --devices 2 --dist-strategy ddp` on CPU, where
Lightning launches the second process and gloo carries the collectives. It runs once per module
and several tests read its run directory.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_image_folder
from safetensors.torch import load_file

import transferlab
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.training.checkpoint import tensors_path
from transferlab.training.distributed import ShardSampler, shard_bounds
from transferlab.training.run import EpochSeededSampler

# What makes one process and two comparable step for step: fp32 features, no augmentation or
# dropout draws (which differ per rank by design), BatchNorm statistics frozen (in train mode
# each device normalises over its own share of the batch), a global batch that splits evenly.
DDP_OPTIONS = {**TINY, "epochs_frozen": 2, "epochs_finetune": 1, "augment": "none", "head_dropout": 0.0,
               "bn": "eval", "precision": "32-true", "device": "cpu"}

# Runs the real CLI with two spies: the fine-tuning sampler's indices and the images each rank's
# training steps receive. Lightning re-runs this same script for the second process.
TRACED_MAIN = """
import json, os, sys
from transferlab.training import finetune, run

trace = os.environ["TRACE_DIR"]
rank = int(os.environ.get("LOCAL_RANK", "0"))
real_iter, real_step = run.EpochSeededSampler.__iter__, finetune.FineTuneModule.training_step

def traced_iter(self):
    order = list(real_iter(self))
    with open(os.path.join(trace, f"sampler-rank{self.rank}-epoch{self.epoch}.json"), "w") as f:
        json.dump(order, f)
    return iter(order)

def traced_step(self, batch, batch_idx):
    with open(os.path.join(trace, f"steps-rank{rank}.txt"), "a") as f:
        f.write(f"{len(batch[1])}\\n")
    return real_step(self, batch, batch_idx)

run.EpochSeededSampler.__iter__ = traced_iter
finetune.FineTuneModule.training_step = traced_step
from transferlab.cli import main
main()
"""


def cli_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else f"--no-{key.replace('_', '-')}")
        else:
            flags += [name, str(value)]
    return flags


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process DDP run on CPU and one single-process run of the same configuration."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(root / "data")  # 24 train / 12 val
    trace = root / "trace"
    trace.mkdir()
    script = root / "traced_main.py"
    script.write_text(textwrap.dedent(TRACED_MAIN))
    src = Path(transferlab.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "TRANSFERLAB_HOME": str(root / "home"), "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRACE_DIR": str(trace), "OMP_NUM_THREADS": "1"}
    options = {k: v for k, v in DDP_OPTIONS.items() if k not in ("pretrained", "early_stop")}
    cmd = [sys.executable, str(script), "train", str(data), "--no-pretrained", "--early-stop", "0",
           *cli_flags(options), "--devices", "2", "--dist-strategy", "ddp",
           "--cache-dir", str(root / "cache-ddp"), "--out", str(root / "ddp")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = transferlab.train(data, out=str(root / "single"), cache_dir=str(root / "cache-single"), **DDP_OPTIONS)
    return {"root": root, "ddp": root / "ddp", "single": single.run_dir, "trace": trace, "stdout": proc.stdout}


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_epoch_sampler_shards_cover_every_sample_once_per_epoch():
    for n, world in [(24, 2), (25, 2), (10, 3), (5, 4)]:
        per_rank = [list(EpochSeededSampler(n, seed=3, start_epoch=4, rank=r, world_size=world)) for r in range(world)]
        assert {len(p) for p in per_rank} == {-(-n // world)}  # equal shares: no rank waits on a collective
        counts = Counter(i for p in per_rank for i in p)
        assert set(counts) == set(range(n))  # none dropped
        assert sum(counts.values()) - n == -n % world  # duplicates only as the padding
    # one process draws the same permutation as before sharding existed, and the union of the
    # ranks' b-th batches is the single process's b-th batch (same global batches, same steps)
    single = list(EpochSeededSampler(24, seed=3, start_epoch=4))
    assert single == torch.randperm(24, generator=torch.Generator().manual_seed(3 * 100_003 + 5)).tolist()
    ranks = [list(EpochSeededSampler(24, seed=3, start_epoch=4, rank=r, world_size=2)) for r in range(2)]
    for b in range(3):
        assert sorted(ranks[0][4 * b:4 * b + 4] + ranks[1][4 * b:4 * b + 4]) == sorted(single[8 * b:8 * b + 8])


def test_val_shards_and_feature_shards_partition_without_padding():
    for n, world in [(12, 2), (7, 3), (2, 4)]:
        val = [i for r in range(world) for i in ShardSampler(n, r, world)]
        assert sorted(val) == list(range(n))
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert [i for a, b in bounds for i in range(a, b)] == list(range(n))


def test_global_batch_must_split_evenly_over_processes():
    with pytest.raises(TransferlabError, match="global batch"):
        TrainConfig(data="x", batch_size=10, devices=4).validate()
    with pytest.raises(TransferlabError, match="dist_strategy"):
        TrainConfig(data="x", dist_strategy="horovod").validate()
    TrainConfig(data="x", batch_size=32, devices=4, num_nodes=2).validate()


def test_fsdp_without_cuda_is_refused_before_any_process_starts(tiny_data, tmp_path):
    with pytest.raises(TransferlabError, match="needs CUDA"):
        transferlab.train(tiny_data, out=str(tmp_path / "r"), device="cpu", devices=2, dist_strategy="fsdp", **TINY)
    assert not (tmp_path / "r").exists()


def test_ddp_run_sees_each_sample_once_per_epoch_and_writes_the_run_once(ddp_run):
    trace = ddp_run["trace"]
    shards = [json.loads((trace / f"sampler-rank{r}-epoch1.json").read_text()) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(24))  # 24 images, 2 ranks: no padding needed
    steps = [[int(x) for x in (trace / f"steps-rank{r}.txt").read_text().split()] for r in range(2)]
    assert steps == [[4, 4, 4], [4, 4, 4]]  # global batch 8 = 4 per process; 24 images trained on
    run = ddp_run["ddp"]
    assert [r["phase"] for r in read_rows(run)] == ["frozen", "frozen", "finetune"]  # rank 0 alone writes
    log = (run / "train.log").read_text()
    assert log.count("run directory:") == 1 and "distributed: 2 processes" in log
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["devices"], summary["dist_strategy"], summary["num_train"]) == (2, "ddp", 24)
    assert ddp_run["stdout"].count("val_accuracy=") == 1  # one report line, not one per process


def test_ddp_run_matches_single_process_run(ddp_run):
    ddp, single = read_rows(ddp_run["ddp"]), read_rows(ddp_run["single"])
    assert [(r["phase"], r["epoch"]) for r in ddp] == [(r["phase"], r["epoch"]) for r in single]
    for a, b in zip(ddp, single):
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), (a["phase"], key)
    # the fine-tuned weights: same global batches, gradients averaged over the ranks
    w_ddp = load_file(tensors_path(ddp_run["ddp"] / "checkpoints" / "last"))
    w_single = load_file(tensors_path(ddp_run["single"] / "checkpoints" / "last"))
    weights = [k for k in w_single if k.startswith("model.")]
    assert weights and set(weights) == {k for k in w_ddp if k.startswith("model.")}
    worst = max((w_ddp[k].float() - w_single[k].float()).abs().max().item() for k in weights)
    assert worst < 1e-4, worst
    moved = load_file(ddp_run["single"] / "checkpoints" / "stage1.safetensors")
    assert any(not torch.equal(moved[k[len("model."):]], w_single[k]) for k in weights)  # fine-tuning did move them


def test_distributed_feature_cache_equals_single_process_cache(ddp_run):
    root = ddp_run["root"]
    ddp = {p.name: load_file(p) for p in (root / "cache-ddp").glob("*.safetensors")}
    single = {p.name: load_file(p) for p in (root / "cache-single").glob("*.safetensors")}
    assert len(single) == 2 and set(ddp) == set(single)  # train + val, under the same keys
    for name in single:
        assert torch.equal(ddp[name]["key"], single[name]["key"])
        assert ddp[name]["features"].shape == single[name]["features"].shape
        torch.testing.assert_close(ddp[name]["features"], single[name]["features"], rtol=1e-5, atol=1e-5)
