"""`transferlab lr-find`, `transferlab.lr_find` and `train --lr-finetune auto` on tiny generated data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from guarantees import cli

import transferlab
from conftest import TINY, make_image_folder
from transferlab.config import DEFAULT_LR_FINETUNE, TrainConfig, parse_lr_finetune
from transferlab.errors import TransferlabError
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone
from transferlab.training import boundary

# lr-find on the tiny test model: the head fitted for 3 epochs, then a short range test
LR_FIND_FLAGS = ["--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--epochs-frozen", "3",
                 "--lr-head", "0.05", "--batch-size", "8", "--num-workers", "0", "--boundary-stages", "1",
                 "--boundary-views", "0", "--num-steps", "20", "--no-progress"]
# boundary fine-tuning, run whatever the head's fit, on one cheap stage
AUTO = {**TINY, "finetune": "boundary", "finetune_when": "always", "boundary_stages": 1, "boundary_views": 0,
        "epochs_finetune": 1, "lr_finetune": "auto"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lr_find_cli_writes_plot_and_json_and_prints_the_suggestion(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(16, 4))
    out = tmp_path / "lr"
    r = cli("lr-find", data, *LR_FIND_FLAGS, "-o", out)
    assert r.code == 0, r.text
    assert "Traceback" not in r.text
    saved = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 0
    assert 0 < len(saved["lrs"]) <= 20 and saved["method"] == "valley"
    assert saved["setup"]["backbone"] == "test_efficientnet" and saved["setup"]["boundary_stages"] == 1
    assert saved["files"] == {"plot": str(out / "lr_find.png"), "json": str(out / "lr_find.json")}
    assert f"plot={out / 'lr_find.png'}" in r.out and "curve:" in r.text
    if saved["suggestion"] is None:
        assert "no suggestion" in r.text and "suggestion=none" in r.out
    else:
        assert saved["lrs"][0] < saved["suggestion"] < saved["lrs"][-1]
        assert "suggested --lr-finetune" in r.text
        assert math.isclose(saved["setup"]["head_lr"], 3 * saved["suggestion"])

    # the API, same seed (features now from the cache, boundary activations recomputed): the same curve
    again = transferlab.lr_find(data, out=tmp_path / "lr2", num_steps=20, backbone="test_efficientnet",
                                pretrained=False, img_size=32, epochs_frozen=3, lr_head=0.05, batch_size=8,
                                num_workers=0, boundary_stages=1, boundary_views=0, progress=False)
    assert again.suggestion == saved["suggestion"]
    assert again.lrs == saved["lrs"] and again.losses == pytest.approx(saved["losses"], rel=1e-6)


def test_lr_find_json_flag_prints_the_file(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(8, 4))
    r = cli("lr-find", data, *LR_FIND_FLAGS, "--num-steps", "10", "--method", "minimum", "-o", tmp_path / "lr",
            "--json")
    assert r.code == 0, r.text
    printed = json.loads(r.out)
    assert printed == json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert printed["method"] == "minimum" and "suggestion" in printed


@pytest.mark.parametrize(("args", "message"), [
    (["--num-steps", "1"], "--num-steps must be at least 10"),
    (["--method", "nope"], "--method 'nope' is not one of valley, steep, minimum"),
    (["--start-lr", "0.1", "--end-lr", "0.01"], "Need 0 < --start-lr < --end-lr"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
])
def test_lr_find_bad_options_fail_before_any_work(tmp_path, extraction_calls, args, message):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "lr"
    r = cli("lr-find", data, *LR_FIND_FLAGS, *args, "-o", out)
    assert r.code == 2, r.text
    assert message in r.text
    assert "Traceback" not in r.text
    assert extraction_calls == [] and not out.exists()


def test_lr_find_missing_data_is_a_clear_error(tmp_path, extraction_calls):
    r = cli("lr-find", tmp_path / "nope", *LR_FIND_FLAGS, "-o", tmp_path / "lr")
    assert r.code == 2
    assert "Data path does not exist" in r.text and "nope" in r.text
    assert "Traceback" not in r.text
    assert extraction_calls == [] and not (tmp_path / "lr").exists()


def test_lr_find_api_rejects_unknown_options_and_backbones_without_a_boundary(tmp_path, extraction_calls):
    data = make_image_folder(tmp_path / "data")
    with pytest.raises(TransferlabError, match="Unknown training option"):
        transferlab.lr_find(data, out=tmp_path / "lr", epochs=3)
    with pytest.raises(TransferlabError, match="no boundary split"):  # the head has no stage to cut below
        transferlab.lr_find(data, out=tmp_path / "lr", backbone="test_efficientnet", pretrained=False,
                            img_size=32, boundary_stages=99)
    assert extraction_calls == [] and not (tmp_path / "lr").exists()


# ---- train --lr-finetune auto

def test_lr_finetune_accepts_a_positive_number_or_auto():
    assert parse_lr_finetune("auto") == "auto" and parse_lr_finetune("AUTO") == "auto"
    assert parse_lr_finetune("3e-4") == 3e-4 and parse_lr_finetune(None) is None
    assert parse_lr_finetune("abc") == "abc"  # left for validate() to reject with its message
    TrainConfig(data="x", lr_finetune="auto").validate()
    TrainConfig(data="x", lr_finetune=1e-4).validate()
    for bad in (-1.0, 0.0, math.nan, math.inf, "abc", True):
        with pytest.raises(TransferlabError, match="lr_finetune must be a number > 0 or 'auto'"):
            TrainConfig(data="x", lr_finetune=bad).validate()
    # auto's fallback, and the full loop's LR under auto: the mode's measured default
    assert TrainConfig(lr_finetune="auto").finetune_lr == DEFAULT_LR_FINETUNE["boundary"]
    assert TrainConfig(lr_finetune="auto", finetune="full").finetune_lr == DEFAULT_LR_FINETUNE["full"]
    assert TrainConfig().lr_finetune is None


def test_auto_survives_the_run_directory_config(tmp_path):
    TrainConfig(data="x", lr_finetune="auto").save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml").lr_finetune == "auto"


@pytest.mark.parametrize("value", ["-1", "abc", "0"])
def test_train_rejects_a_bad_lr_finetune_before_any_work(tmp_path, extraction_calls, value):
    data = make_image_folder(tmp_path / "data")
    r = cli("train", data, "--backbone", "test_efficientnet", "--no-pretrained", "--lr-finetune", value,
            "--out", tmp_path / "run")
    assert r.code == 2, r.text
    assert "lr_finetune must be a number > 0 or 'auto'" in r.text
    assert "Traceback" not in r.text
    assert extraction_calls == [] and not (tmp_path / "run").exists()


def test_train_auto_on_too_few_batches_keeps_the_default_and_says_why(tmp_path):
    data = make_image_folder(tmp_path / "data")  # 24 train images: 3 steps an epoch at batch 8
    r = cli("train", data, "--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32",
            "--epochs-frozen", "2", "--epochs-finetune", "1", "--batch-size", "8", "--num-workers", "0",
            "--finetune-when", "always", "--boundary-stages", "1", "--boundary-views", "0", "--lr-head", "0.05",
            "--lr-finetune", "auto", "--no-progress", "--no-report", "--out", tmp_path / "run")
    assert r.code == 0, r.text
    ft = json.loads((tmp_path / "run" / "summary.json").read_text())["finetune"]
    assert ft["mode"] == "boundary" and ft["epochs_run"] == 1
    assert ft["lr_source"] == "default" and ft["lr"] == DEFAULT_LR_FINETUNE["boundary"]
    assert "too few for an LR range test" in ft["lr_reason"] and "too few" in r.text


def test_train_auto_runs_the_range_test_and_the_same_seed_gives_the_same_lr(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(20, 4))  # 40 images at batch 2: a 40-step test
    runs = [transferlab.train(data, out=str(tmp_path / f"run{i}"), **{**AUTO, "batch_size": 2}) for i in range(2)]
    first, second = (r.summary["finetune"] for r in runs)
    assert first["lr_source"] in ("auto", "default")
    if first["lr_source"] == "auto":
        assert first["lr"] == first["lr_find"]["suggestion"] and first["lr_find"]["steps"] > 0
        assert 1e-7 < first["lr"] < 1.0
    else:  # no suggestion from the curve: the default, with why
        assert first["lr"] == DEFAULT_LR_FINETUNE["boundary"] and "range test" in first["lr_reason"]
    # (the second run's features come from the cache, its boundary activations from the folded bottom)
    assert second["lr"] == first["lr"] and second["lr_source"] == first["lr_source"]


def test_user_and_default_lr_are_recorded_as_such(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(6, 3))
    user = transferlab.train(data, out=str(tmp_path / "user"), **{**AUTO, "lr_finetune": 2e-3, "epochs_frozen": 1})
    assert user.summary["finetune"]["lr"] == 2e-3 and user.summary["finetune"]["lr_source"] == "user"
    full = transferlab.train(data, out=str(tmp_path / "full"), **{**AUTO, "finetune": "full", "epochs_frozen": 1})
    assert full.summary["finetune"] == {"mode": "full", "lr": DEFAULT_LR_FINETUNE["full"], "lr_source": "default",
                                        "lr_reason": "--lr-finetune auto applies to boundary fine-tuning only"}


def test_the_range_test_of_the_top_leaves_the_top_and_the_rng_as_they_were():
    spec = resolve_backbone("test_efficientnet", pretrained=False, img_size=32)
    model = build_classifier(spec, 3, HeadConfig(kind="linear"))
    split = boundary.split_model(model, 1)
    torch.manual_seed(0)
    x = split.bottom.eval()(torch.randn(24, 3, 32, 32)).detach()
    y = torch.arange(24) % 3
    for p in split.top.parameters():
        p.requires_grad_(False)
    split.top.eval()
    before = {k: v.clone() for k, v in split.top.state_dict().items()}
    rng = torch.get_rng_state()
    kw = {"head_lr_multiplier": 3.0, "weight_decay": 0.01, "label_smoothing": 0.1, "batch_size": 8, "seed": 1,
          "num_steps": 20}
    result = boundary.range_test_top(split.top, [x], y, **kw)
    assert len(result.lrs) > 0
    assert all(torch.equal(before[k], v) for k, v in split.top.state_dict().items())
    assert not any(p.requires_grad for p in split.top.parameters())
    assert not any(m.training for m in split.top.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    again = boundary.range_test_top(split.top, [x], y, **kw)
    assert again.lrs == result.lrs and again.losses == result.losses and again.suggestion == result.suggestion
