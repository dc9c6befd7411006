"""The CLI as a user meets it: real subprocesses, exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import make_image_folder


def cli(*args, cwd=None):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "transferlab", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300, check=False)


def test_train_then_predict_json_through_the_cli(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    p = cli("train", data, "--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32",
            "--epochs-frozen", "2", "--epochs-finetune", "1", "--batch-size", "8", "--out", run, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "val_accuracy=" in p.stdout and str(run) in p.stdout
    logged = p.stderr.splitlines()  # piped: plain log lines, not padded to a console width
    assert any(line.startswith("INFO     data: ") for line in logged)
    assert not any(line.endswith(" ") for line in logged)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    p = cli("predict", run, data / "val" / "blue", bad, "--top-k", "1", "--json")
    assert p.returncode == 1, p.stderr  # 1: some inputs could not be used; they are listed, the others predicted
    results = json.loads(p.stdout)
    assert len(results) == 7
    assert all(len(r["predictions"]) == 1 for r in results if "error" not in r)
    assert next(r for r in results if "error" in r)["path"] == str(bad)
    p = cli("predict", run, data / "val" / "blue", "--top-k", "1", "--json")
    assert p.returncode == 0, p.stderr  # every input predicted


def test_missing_data_path_is_a_clear_error_without_traceback(tmp_path):
    p = cli("train", tmp_path / "nope", "--backbone", "test_efficientnet", "--no-pretrained")
    assert p.returncode == 2
    assert "error" in p.stderr.lower() and "nope" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_single_class_folder_is_a_clear_error(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("red",))
    p = cli("train", data, "--backbone", "test_efficientnet", "--no-pretrained", "--out", tmp_path / "r")
    assert p.returncode == 2
    assert "class" in p.stderr.lower()
    assert "Traceback" not in p.stderr


def test_backbone_needing_a_download_fails_fast_offline_naming_usable_ones(tmp_path):
    data = make_image_folder(tmp_path / "data")
    p = cli("train", data, "--backbone", "tv:resnet50", "--out", tmp_path / "r")
    assert p.returncode == 2
    assert "efficientnet_lite0" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_predict_on_a_directory_without_a_model_is_a_clear_error(tmp_path):
    p = cli("predict", tmp_path, "x.jpg")
    assert p.returncode == 2 and "model" in p.stderr.lower()
    assert "Traceback" not in p.stderr


def test_models_offline_lists_the_shipped_backbones():
    p = cli("models", "--offline", "--json")
    assert p.returncode == 0, p.stderr
    names = {r["name"] for r in json.loads(p.stdout)}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= names


def test_interrupting_train_says_how_to_resume(tmp_path):
    """Ctrl+C (SIGINT) during training: exit 130 with the --resume command, not a traceback."""
    import signal
    import time

    data = make_image_folder(tmp_path / "data", per_class=(40, 6))
    run = tmp_path / "run"
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab", "train", str(data), "--backbone", "test_efficientnet",
         "--no-pretrained", "--img-size", "32", "--epochs-frozen", "1", "--finetune", "full", "--epochs-finetune", "200",
         "--batch-size", "8", "--finetune-gate", "0", "--out", str(run), "--no-progress", "--no-report"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "last.json").exists():
        time.sleep(0.2)
    assert (run / "checkpoints" / "last.json").exists(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"--resume {run}" in err
    assert "Traceback" not in err
