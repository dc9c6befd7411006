"""Reading datasets: layouts, splitting, skipping bad files, clear errors, leakage warnings."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data.datasets import ImageDataset
from transferlab.data.digits import (
    DIGITS_COUNT,
    default_datasets_root,
    materialize_digits,
)
from transferlab.data.sources import (
    LAYOUT_CLASS_FOLDERS,
    LAYOUT_CSV,
    LAYOUT_SPLIT_FOLDERS,
    DataSplits,
    Sample,
    load_splits,
)
from transferlab.data.transforms import Preprocessing, eval_transform
from transferlab.errors import DataError

_counter = iter(range(1_000_000))


def write_image(path: Path, size: int = 12) -> Path:
    """A small PNG with unique content, so no accidental byte-identical duplicates."""
    rng = np.random.default_rng(next(_counter))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def class_folders(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / name / f"{i:03d}.png")
    return root


def split_folders(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, counts in layout.items():
        class_folders(root / split, counts)
    return root


def names(samples: list[Sample]) -> list[str]:
    return [s.path.name for s in samples]


# --- layouts -------------------------------------------------------------------------------


def test_split_folders_take_classes_from_train(tmp_path):
    root = split_folders(
        tmp_path / "data",
        {
            "train": {"cat": 3, "dog": 2},
            "val": {"cat": 1, "dog": 1},
            "test": {"dog": 2},
        },
    )
    splits = load_splits(root, progress=False)
    assert splits.layout == LAYOUT_SPLIT_FOLDERS
    assert splits.classes == ["cat", "dog"]
    assert splits.counts() == {
        "train": {"cat": 3, "dog": 2},
        "val": {"cat": 1, "dog": 1},
        "test": {"cat": 0, "dog": 2},
    }
    assert all(s.path.is_absolute() for s in splits.train)
    assert [s.label for s in splits.train] == [0, 0, 0, 1, 1]
    assert splits.skipped == []
    assert splits.warnings == []


@pytest.mark.parametrize("val_name", ["valid", "validation"])
def test_val_folder_aliases_are_accepted(tmp_path, val_name):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 2, "b": 2}, val_name: {"a": 1, "b": 1}}
    )
    splits = load_splits(root, progress=False)
    assert splits.layout == LAYOUT_SPLIT_FOLDERS
    assert len(splits.val) == 2


def test_train_class_without_val_images_is_a_warning(tmp_path):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 1, "b": 1}}
    )
    splits = load_splits(root, progress=False)
    assert splits.classes == ["a", "b", "c"]
    assert any("'c'" in w and "no validation images" in w for w in splits.warnings)


def test_class_in_val_but_not_in_train_is_an_error_naming_it(tmp_path):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "zebra": 1}}
    )
    with pytest.raises(DataError, match=r"val split.*zebra"):
        load_splits(root, progress=False)


def test_class_in_test_but_not_in_train_is_an_error_naming_it(tmp_path):
    root = split_folders(
        tmp_path / "d",
        {"train": {"a": 2, "b": 2}, "val": {"a": 1}, "test": {"okapi": 1}},
    )
    with pytest.raises(DataError, match=r"test split.*okapi"):
        load_splits(root, progress=False)


def test_val_folder_without_train_folder_is_an_error(tmp_path):
    root = class_folders(tmp_path / "d", {"val": 2, "test": 2})
    with pytest.raises(DataError, match="no train/ folder"):
        load_splits(root, progress=False)


def test_train_folder_without_val_is_split_automatically(tmp_path):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 5, "b": 5}, "test": {"a": 1, "b": 1}}
    )
    splits = load_splits(root, progress=False)
    assert splits.layout == LAYOUT_CLASS_FOLDERS
    assert splits.counts()["val"] == {"a": 1, "b": 1}
    assert len(splits.test) == 2


def test_empty_val_folder_is_an_error(tmp_path):
    root = split_folders(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    (root / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"validation split .* is empty"):
        load_splits(root, progress=False)


# --- splitting -------------------------------------------------------------------------------


def test_stratified_split_is_deterministic_and_covers_every_class(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 10, "b": 7, "c": 2, "d": 3})
    first = load_splits(root, val_split=0.2, seed=3, progress=False)
    again = load_splits(root, val_split=0.2, seed=3, progress=False)
    other = load_splits(root, val_split=0.2, seed=4, progress=False)
    assert first.layout == LAYOUT_CLASS_FOLDERS
    assert first.train == again.train
    assert first.val == again.val
    assert first.val != other.val
    assert first.counts()["val"] == {"a": 2, "b": 1, "c": 1, "d": 1}
    assert not {s.path for s in first.train} & {s.path for s in first.val}
    assert len(first.train) + len(first.val) == 22


def test_single_image_class_stays_in_train_with_a_warning(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 4, "b": 1})
    splits = load_splits(root, progress=False)
    assert splits.counts()["train"]["b"] == 1
    assert splits.counts()["val"]["b"] == 0
    assert any("'b'" in w and "only 1 image" in w for w in splits.warnings)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_split_outside_open_unit_interval_is_an_error(tmp_path, fraction):
    root = class_folders(tmp_path / "d", {"a": 3, "b": 3})
    with pytest.raises(DataError, match="val_split must be between 0 and 1"):
        load_splits(root, val_split=fraction, progress=False)


def test_validation_split_cannot_be_empty(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"validation split .* is empty"):
        load_splits(root, progress=False)


# --- user errors ----------------------------------------------------------------------------


def test_missing_path_is_an_error_that_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*class sub-folders"):
        load_splits(tmp_path / "nope", progress=False)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="No images found"):
        load_splits(tmp_path / "d", progress=False)


def test_images_without_class_folders_is_an_error(tmp_path):
    write_image(tmp_path / "d" / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_splits(tmp_path / "d", progress=False)


def test_single_class_is_an_error(tmp_path):
    root = class_folders(tmp_path / "d", {"only": 5})
    with pytest.raises(DataError, match=r"Only one class .*'only'.* at least two"):
        load_splits(root, progress=False)


def test_empty_class_folder_is_dropped_with_a_warning(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 3, "b": 3, "empty": 0})
    splits = load_splits(root, progress=False)
    assert splits.classes == ["a", "b"]
    assert any("'empty'" in w and "no images" in w for w in splits.warnings)


def test_empty_class_folder_leaving_one_class_is_an_error(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 3, "empty": 0})
    with pytest.raises(DataError, match="Only one class"):
        load_splits(root, progress=False)


def test_non_image_file_path_is_an_error(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=r"not a \.csv"):
        load_splits(path, progress=False)


# --- bad and odd files ----------------------------------------------------------------------


def test_bad_files_are_skipped_with_reasons_and_logged(tmp_path, caplog):
    root = class_folders(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "empty.jpg").touch()
    (root / "a" / "html.jpg").write_text("<html></html>")
    jpeg = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    ).save(jpeg, "JPEG")
    (root / "b" / "cut.jpg").write_bytes(jpeg.getvalue()[:600])
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        splits = load_splits(root, progress=False)
    reasons = {Path(e["path"]).name: e["reason"] for e in splits.skipped}
    assert reasons["empty.jpg"] == "zero-byte file"
    assert reasons["html.jpg"].startswith("not an image")
    assert reasons["cut.jpg"].startswith("truncated or corrupt image")
    assert len(splits.train) + len(splits.val) == 6
    assert "empty.jpg" in caplog.text
    assert "cut.jpg" in caplog.text


def test_decompression_bomb_in_folder_is_skipped(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (20000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (root / "a" / "bomb.png").write_bytes(bytes(data))
    splits = load_splits(root, progress=False)
    (entry,) = splits.skipped
    assert entry["reason"].startswith("decompression bomb: 20000x20000")


def test_class_whose_images_are_all_unreadable_is_dropped(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2, "broken": 0})
    (root / "broken" / "x.png").write_bytes(b"garbage")
    splits = load_splits(root, progress=False)
    assert splits.classes == ["a", "b"]
    assert any("'broken'" in w and "unreadable" in w for w in splits.warnings)


def test_hidden_and_non_image_files_are_ignored_silently(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "a" / "._001.png").write_bytes(b"resource fork")
    (root / "a" / "notes.txt").write_text("x")
    write_image(root / ".hidden_class" / "x.png")
    write_image(root / "__MACOSX" / "a" / "y.png")
    splits = load_splits(root, progress=False)
    assert splits.classes == ["a", "b"]
    assert splits.skipped == []
    assert len(splits.train) + len(splits.val) == 4


def test_uppercase_extensions_and_nested_folders_are_found(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 1, "b": 2})
    write_image(root / "a" / "sub" / "deeper" / "X.PNG")
    splits = load_splits(root, progress=False)
    assert "X.PNG" in names(splits.train + splits.val)


def test_unicode_and_spaces_in_paths(tmp_path):
    root = tmp_path / "données d'été"
    write_image(root / "chat noir" / "photo 1 ü.png")
    write_image(root / "chat noir" / "фото 2.png")
    write_image(root / "狗" / "写真 3.png")
    write_image(root / "狗" / "b c.png")
    splits = load_splits(root, progress=False)
    assert splits.classes == ["chat noir", "狗"]
    assert all(s.path.exists() for s in splits.train + splits.val)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop_does_not_hang(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    os.symlink(root / "a", root / "a" / "loop", target_is_directory=True)
    os.symlink(root, root / "b" / "up", target_is_directory=True)
    result: list[DataSplits] = []
    worker = threading.Thread(
        target=lambda: result.append(load_splits(root, progress=False))
    )
    worker.daemon = True
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "load_splits hung on a symlink loop"
    (splits,) = result
    assert splits.counts()["train"]["a"] + splits.counts()["val"]["a"] >= 2


def test_validate_false_does_not_open_files(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "empty.jpg").touch()
    splits = load_splits(root, validate=False, progress=False)
    assert splits.skipped == []
    assert "empty.jpg" in names(splits.train + splits.val)


# --- CSV --------------------------------------------------------------------------------------


def test_csv_with_relative_and_absolute_paths_splits_by_fraction(tmp_path):
    for i in range(5):
        write_image(tmp_path / "img" / f"c{i}.png")
        write_image(tmp_path / "img" / f"d{i}.png")
    rows = [f"img/c{i}.png,cat" for i in range(5)]
    rows += [f"{tmp_path / 'img' / f'd{i}.png'},dog" for i in range(5)]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "\n".join(rows) + "\n")
    splits = load_splits(csv_path, val_split=0.2, progress=False)
    assert splits.layout == LAYOUT_CSV
    assert splits.classes == ["cat", "dog"]
    assert splits.counts()["val"] == {"cat": 1, "dog": 1}
    assert splits.skipped == []


def test_csv_bad_rows_and_missing_files_are_skipped(tmp_path):
    for name in ["a1", "a2", "b1", "b2"]:
        write_image(tmp_path / f"{name}.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "Path,Label,Split\n"
        "a1.png,a,train\n"
        "a2.png,a,val\n"
        "b1.png,b,train\n"
        "b2.png,b,validation\n"
        "ghost.png,b,train\n"
        ",a,train\n"
        "a1.png,,train\n"
        "a1.png,b,train\n"
        "b1.png,b,holdout\n"
    )
    splits = load_splits(csv_path, progress=False)
    assert splits.counts()["train"] == {"a": 1, "b": 1}
    assert splits.counts()["val"] == {"a": 1, "b": 1}
    reasons = sorted(e["reason"] for e in splits.skipped)
    assert len(reasons) == 5
    assert "file not found" in reasons
    assert "missing path" in reasons
    assert any(r.startswith("missing label") for r in reasons)
    assert any("listed again (first at line 2)" in r for r in reasons)
    assert any(r.startswith("unknown split 'holdout'") for r in reasons)
    assert {Path(e["path"]).name for e in splits.skipped} >= {
        "ghost.png",
        "labels.csv:7",
    }


def test_csv_without_required_columns_is_an_error(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,class\nx.png,a\n")
    with pytest.raises(DataError, match=r"'path' and 'label'.*found: file, class"):
        load_splits(csv_path, progress=False)


def test_csv_with_no_usable_rows_is_an_error(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nmissing1.png,a\nmissing2.png,b\n")
    with pytest.raises(DataError, match=r"No usable training images.*file not found"):
        load_splits(csv_path, progress=False)


def test_csv_split_column_without_val_rows_is_an_error(tmp_path):
    for name in ["a1", "b1"]:
        write_image(tmp_path / f"{name}.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label,split\na1.png,a,train\nb1.png,b,train\n")
    with pytest.raises(DataError, match="split=val"):
        load_splits(csv_path, progress=False)


# --- leakage --------------------------------------------------------------------------------


def test_identical_files_across_train_and_val_are_reported(tmp_path):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}
    )
    shutil.copy(root / "train" / "a" / "000.png", root / "val" / "a" / "copy.png")
    splits = load_splits(root, progress=False)
    assert (
        "duplicate across train/val: train/a/000.png == val/a/copy.png"
        in splits.warnings
    )


def test_identical_files_within_train_get_one_summary_line(tmp_path):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}
    )
    for i in range(3):
        shutil.copy(
            root / "train" / "a" / "000.png", root / "train" / "a" / f"dup{i}.png"
        )
    shutil.copy(
        root / "train" / "b" / "000.png", root / "train" / "a" / "mislabelled.png"
    )
    splits = load_splits(root, progress=False)
    lines = [w for w in splits.warnings if "within train" in w]
    assert len(lines) == 1
    assert lines[0].startswith(
        "4 byte-identical duplicate file(s) within train in 2 group(s)"
    )
    assert "1 group(s) carry different labels" in lines[0]
    assert not any(w.startswith("duplicate across") for w in splits.warnings)


def test_cross_split_duplicate_warnings_are_capped(tmp_path):
    root = split_folders(
        tmp_path / "d", {"train": {"a": 25, "b": 1}, "val": {"a": 1, "b": 1}}
    )
    for i in range(25):
        shutil.copy(
            root / "train" / "a" / f"{i:03d}.png", root / "val" / "a" / f"c{i:03d}.png"
        )
    splits = load_splits(root, progress=False)
    across = [w for w in splits.warnings if w.startswith("duplicate across")]
    assert len(across) == 20
    assert "and 5 more duplicates across splits" in splits.warnings


# --- results --------------------------------------------------------------------------------


def test_summary_is_json_serialisable_and_complete(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "bad.png").write_bytes(b"x")
    summary = load_splits(root, progress=False).to_summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["classes"] == ["a", "b"]
    assert summary["num_train"] + summary["num_val"] == 6
    assert summary["num_test"] == 0
    assert summary["layout"] == LAYOUT_CLASS_FOLDERS
    assert summary["skipped"][0]["path"].endswith("bad.png")
    assert set(summary["counts"]) == {"train", "val", "test"}


def test_image_dataset_returns_tensor_and_label(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    splits = load_splits(root, progress=False)
    dataset = ImageDataset(splits.train, eval_transform(Preprocessing(input_size=16)))
    tensor, label = dataset[len(dataset) - 1]
    assert tensor.shape == (3, 16, 16)
    assert tensor.dtype == torch.float32
    assert label == 1
    assert dataset.labels == [s.label for s in splits.train]


def test_image_dataset_survives_a_file_vanishing_after_validation(tmp_path, caplog):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    splits = load_splits(root, progress=False)
    pre = Preprocessing(input_size=16)
    dataset = ImageDataset(splits.train, eval_transform(pre))
    splits.train[0].path.unlink()
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        tensor, label = dataset[0]
    black = eval_transform(pre)(Image.new("RGB", (16, 16)))
    assert torch.allclose(tensor, black)
    assert label == splits.train[0].label
    assert "unreadable after validation" in caplog.text


# --- demo dataset ---------------------------------------------------------------------------


def test_digits_are_materialized_once_as_class_folders(tmp_path):
    folder = materialize_digits(tmp_path)
    assert folder == tmp_path / "digits"
    pngs = sorted(folder.glob("*/*.png"))
    assert len(pngs) == DIGITS_COUNT == 1797
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        str(d) for d in range(10)
    ]
    with Image.open(pngs[0]) as image:
        assert image.size == (32, 32)
        assert image.mode == "L"
        assert image.getextrema()[1] > 200  # 0..16 scaled up to 0..255
    stamp = pngs[0].stat().st_mtime_ns
    assert materialize_digits(tmp_path) == folder
    assert pngs[0].stat().st_mtime_ns == stamp
    splits = load_splits(folder, validate=False, progress=False)
    assert splits.classes == [str(d) for d in range(10)]
    assert len(splits.train) + len(splits.val) == 1797


def test_digits_default_location_follows_transferlab_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_HOME", str(tmp_path / "home"))
    assert default_datasets_root() == tmp_path / "home" / "datasets"


def test_incomplete_digits_folder_is_rebuilt(tmp_path):
    (tmp_path / "digits" / "3").mkdir(parents=True)
    (tmp_path / "digits" / "3" / "junk.png").write_bytes(b"partial")
    folder = materialize_digits(tmp_path)
    assert not (folder / "3" / "junk.png").exists()
    assert len(list(folder.glob("*/*.png"))) == 1797
