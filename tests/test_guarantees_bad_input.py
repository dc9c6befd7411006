"""The bad-input catalogue: one test per case, each pinning what the user sees.

Most awkward files share one dataset and one `transferlab train` run (through the CLI, in-process):
each case asserts how its file came out (skipped with this exact reason, or decoded and used) and that
the run around it finished with all its outputs. Cases that stop a run get a run of their own.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_image, make_image_folder
from guarantees import (
    TINY_FLAGS,
    animated_gif,
    cli,
    cmyk_jpeg,
    exif_rotated_jpeg,
    palette_png_with_transparency,
    png_bytes,
    png_claiming,
    read_metrics,
    sixteen_bit_png,
    truncated_jpeg,
)
from PIL import Image

import transferlab
from transferlab import io as io_module
from transferlab.data.images import MAX_PIXELS, load_image
from transferlab.training.checkpoint import load_training_state
from transferlab.training.finetune import FineTuneModule

# case -> (file below train/red/, how it is made); all land in one dataset
SKIPPED = {
    "zero-byte file": ("empty.jpg", lambda p: p.touch(), "zero-byte file"),
    "truncated JPEG": ("cut.jpg", truncated_jpeg, "truncated or corrupt image"),
    "non-image with an image extension": ("page.jpg", lambda p: p.write_text("<html>404</html>"),
                                          "not an image (unrecognised file format)"),
    "20000x20000 header (decompression bomb)": ("bomb.png", lambda p: png_claiming(p, 20000, 20000),
                                                f"decompression bomb: 20000x20000 pixels exceeds limit {MAX_PIXELS}"),
}
USED = {
    "image with no extension": ("photo_without_extension", lambda p: p.write_bytes(png_bytes(Image.new("RGB", (40, 40), "red")))),
    "16-bit PNG": ("scan16.png", sixteen_bit_png),
    "CMYK JPEG": ("print.jpg", cmyk_jpeg),
    "palette PNG with transparency": ("logo.png", palette_png_with_transparency),
    "1x1 image": ("pixel.png", lambda p: Image.new("RGB", (1, 1), (200, 40, 40)).save(p)),
    "animated GIF": ("anim.gif", animated_gif),
    "EXIF-rotated photo": ("phone.jpg", exif_rotated_jpeg),
    "unicode and spaces in paths": ("sous dossier é/photo 1 ü 狗.png", lambda p: make_image(p, (200, 40, 40), _rng())),
}
GOOD_TRAIN, GOOD_VAL = 24, 12  # make_image_folder's 2 classes x (12 train, 6 val)


def _rng():
    import numpy as np

    return np.random.default_rng(7)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """One dataset holding every awkward file, trained once through the CLI."""
    root = tmp_path_factory.mktemp("cat") / "données d'été"
    make_image_folder(root)
    red = root / "train" / "red"
    for name, make, _ in SKIPPED.values():
        make(red / name)
    for name, make in USED.values():
        (red / name).parent.mkdir(parents=True, exist_ok=True)
        make(red / name)
    (root / "train" / "empty").mkdir()  # a class folder with nothing in it
    os.symlink(red, red / "loop", target_is_directory=True)  # links back to itself
    os.symlink(root, root / "train" / "blue" / "up", target_is_directory=True)  # back to the data root
    run = root.parent / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root.parent / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        result = cli("train", root, *TINY_FLAGS, "--out", run)
        predictions = {p["path"]: p for p in transferlab.predict(run, [red / name for name, _ in USED.values()])}
    return {"root": root, "run": run, "result": result, "data": json.loads((run / "data.json").read_text()),
            "predictions": predictions}


def assert_run_intact(catalogue) -> None:
    """The run finished with every output, trained on all usable images, and learned the task."""
    result, run = catalogue["result"], catalogue["run"]
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    for name in ("summary.json", "model.safetensors", "model.json", "metrics.csv", "curves.png", "data.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == ["blue", "red"]
    assert summary["num_train"] == GOOD_TRAIN + len(USED) and summary["num_val"] == GOOD_VAL
    assert [r["phase"] for r in read_metrics(run)] == ["frozen"] * 3 + ["finetune"] * 2
    assert summary["val_accuracy_best"] >= 0.9


def skipped(catalogue) -> dict[str, str]:
    return {Path(e["path"]).name: e["reason"] for e in catalogue["data"]["skipped"]}


@pytest.mark.parametrize("case", list(SKIPPED))
def test_unusable_file_is_skipped_with_its_reason_and_the_run_completes(catalogue, case):
    name, _, reason = SKIPPED[case]
    assert skipped(catalogue)[name].startswith(reason)
    # listed in summary.json and in the log too, with the same reason
    summary = json.loads((catalogue["run"] / "summary.json").read_text())
    assert any(Path(e["path"]).name == name and e["reason"].startswith(reason) for e in summary["skipped_files"])
    assert name in (catalogue["run"] / "train.log").read_text()
    assert_run_intact(catalogue)


@pytest.mark.parametrize("case", list(USED))
def test_awkward_but_valid_image_is_decoded_and_used(catalogue, case):
    name, _ = USED[case]
    path = catalogue["root"] / "train" / "red" / name
    assert Path(name).name not in skipped(catalogue)
    image = load_image(path)
    assert image.mode == "RGB"
    prediction = catalogue["predictions"][str(path)]
    assert "error" not in prediction and prediction["predictions"][0]["probability"] > 0
    assert_run_intact(catalogue)


def test_image_with_no_extension_is_recognised_by_content_and_reported(catalogue):
    assert any("without an extension" in w and "recognised as images by their content" in w
               for w in catalogue["data"]["warnings"])


def test_exif_rotated_photo_is_used_upright(catalogue):
    image = load_image(catalogue["root"] / "train" / "red" / USED["EXIF-rotated photo"][0])
    assert image.size == (20, 40)


def test_symlink_loops_are_skipped_and_reported_not_followed(catalogue):
    reasons = skipped(catalogue)
    assert reasons["loop"].startswith("symlink loop: links back to its parent folder")
    assert reasons["up"].startswith("symlink loop")
    # nothing was read twice or under the wrong class: the counts are exactly the real files
    assert catalogue["data"]["counts"]["train"]["blue"] == 12
    assert_run_intact(catalogue)


def test_empty_class_folder_is_ignored_with_a_warning(catalogue):
    assert "class folder 'empty' contains no images and was ignored" in catalogue["data"]["warnings"]
    assert catalogue["data"]["classes"] == ["blue", "red"]
    assert_run_intact(catalogue)


# --- cases that stop a run before it starts: exit code 2, a message, no traceback, no run written

def test_single_class_is_an_error_naming_it(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("red",))
    r = cli("train", data, *TINY_FLAGS, "--out", tmp_path / "run")
    assert r.code == 2 and "Traceback" not in r.text
    assert "Only one class ('red') has usable training images" in r.text and "at least two" in r.text
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_class_in_val_but_not_in_train_is_an_error_naming_it(tmp_path):
    data = make_image_folder(tmp_path / "data")
    make_image(data / "val" / "green" / "g.png", (40, 180, 60), _rng())
    r = cli("train", data, *TINY_FLAGS, "--out", tmp_path / "run")
    assert r.code == 2 and "Traceback" not in r.text
    assert "The val split has images of class(es) with no usable training images: green" in r.text
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unwritable_output_directory_is_refused_before_any_work(tmp_path, extraction_calls):
    data = make_image_folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # even root cannot create a folder inside a file
    r = cli("train", data, *TINY_FLAGS, "--out", blocker / "run")
    assert r.code == 2 and "Traceback" not in r.text
    assert f"Cannot write to output directory '{blocker / 'run'}'" in r.text and "--out" in r.text
    assert extraction_calls == []


def test_csv_with_missing_paths_and_bad_rows_skips_each_row_with_its_reason(tmp_path):
    data = make_image_folder(tmp_path / "data")
    rows = ["path,label,split"]
    rows += [f"{p.relative_to(tmp_path)},{p.parent.name},{p.parts[-3]}" for p in sorted(data.rglob("*.png"))]
    rows += [",red,train", "data/train/red/red_0.png,,train", "nowhere/ghost.png,red,train",
             "data/train/blue/blue_0.png,blue,holdout", "data/train/red/red_1.png,red,train", "just one field"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    r = cli("train", tmp_path / "labels.csv", *TINY_FLAGS, "--strategy", "head-only", "--epochs-frozen", "1",
            "--out", tmp_path / "run")
    assert r.code == 0, r.err
    skipped_rows = {e["path"]: e["reason"] for e in json.loads((tmp_path / "run" / "data.json").read_text())["skipped"]}
    n = len(rows)  # line numbers of the bad rows: header is line 1
    assert skipped_rows[f"labels.csv:{n - 5}"] == "missing path"
    assert skipped_rows[f"labels.csv:{n - 4}"] == "missing label for data/train/red/red_0.png"
    assert skipped_rows[str(tmp_path / "nowhere" / "ghost.png")] == "file not found"
    assert skipped_rows[f"labels.csv:{n - 2}"] == "unknown split 'holdout' (expected train, val or test)"
    assert skipped_rows[f"labels.csv:{n - 1}"].startswith("data/train/red/red_1.png listed again (first at line")
    assert skipped_rows[f"labels.csv:{n}"] == "missing label for just one field"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_train"] == 24 and summary["num_val"] == 12


# --- cases that stop a run in the middle: the message says what happened, the last good state is kept


def test_disk_full_on_checkpoint_write_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    real_write, checkpoint_writes = io_module._write_bytes, []

    def disk_full_at_second_checkpoint(tmp, payload):
        if Path(tmp).name.startswith(".last-"):
            checkpoint_writes.append(tmp)
            if len(checkpoint_writes) == 2:
                real_write(tmp, payload[: len(payload) // 2])  # half the bytes made it, then the disk filled
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(tmp, payload)

    monkeypatch.setattr(io_module, "_write_bytes", disk_full_at_second_checkpoint)
    r = cli("train", data, *TINY_FLAGS, "--out", run)
    assert r.code == 2 and "Traceback" not in r.text
    assert "Could not write" in r.text and "the disk is full: free some space" in r.text
    assert "Nothing was overwritten" in r.text and "--resume" in r.text
    _model, _trees, info, _rng_state = load_training_state(run / "checkpoints" / "last")
    assert info["epoch"] == 1  # the previous checkpoint, whole
    assert json.loads((run / "state.json").read_text())["finetune_epochs_done"] == 1
    assert not list(run.rglob("*.tmp"))  # the half-written file was removed
    monkeypatch.setattr(io_module, "_write_bytes", real_write)
    r = cli("train", "--resume", run)
    assert r.code == 0, r.err
    assert [(x["phase"], x["epoch"]) for x in read_metrics(run)][-2:] == [("finetune", "1"), ("finetune", "2")]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    real_forward = FineTuneModule.forward

    def nan_from_second_epoch(self, x):
        logits = real_forward(self, x)
        return logits * float("nan") if self.training and self.current_epoch >= 1 else logits

    monkeypatch.setattr(FineTuneModule, "forward", nan_from_second_epoch)
    r = cli("train", data, *TINY_FLAGS, "--out", run)
    assert r.code == 2 and "Traceback" not in r.text
    assert "Training diverged: the loss became nan" in r.text
    assert "the checkpoint of fine-tuning epoch 1 is kept" in r.text and "--lr-finetune" in r.text
    model_state, _trees, info, _rng_state = load_training_state(run / "checkpoints" / "last")
    assert info["epoch"] == 1 and all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point())
    assert [(x["phase"], x["epoch"]) for x in read_metrics(run)][-1] == ("finetune", "1")
    # the best model so far still predicts
    (pred,) = transferlab.predict(run, [data / "val" / "red" / "red_0.png"])
    assert pred["predictions"][0]["label"] == "red"
