"""WebDataset tar shards: written from a folder, read in place, trained on like the folder itself."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from conftest import TINY, make_image_folder

import transferlab
from transferlab.data import load_splits
from transferlab.data.shards import expand_braces
from transferlab.data.storage import member_bytes
from transferlab.errors import DataError


@pytest.fixture
def folder_and_shards(tmp_path):
    # class folders without val/: the split is made once, by `shards`, and kept by the shard set
    data = make_image_folder(tmp_path / "data", classes=("red", "green", "blue"), per_class=(7,), splits=("all",))
    data = data / "all"
    manifest = transferlab.api.shards(data, tmp_path / "shards", shard_size=4, progress=False)
    return data, tmp_path / "shards", manifest


def test_shards_keep_the_folders_classes_split_and_bytes(folder_and_shards):
    data, shards, manifest = folder_and_shards
    folder, sharded = load_splits(data, progress=False), load_splits(shards, progress=False)
    assert sharded.layout == "webdataset shards"
    assert sharded.classes == folder.classes == ["blue", "green", "red"]
    assert sharded.counts() == folder.counts()
    assert manifest["splits"]["train"]["samples"] == len(folder.train) == 18
    assert len(manifest["splits"]["train"]["shards"]) == 5  # 18 images, 4 per shard
    by_name = {s.path.name: s for s in folder.train + folder.val}
    for s in sharded.train + sharded.val:
        meta = json.loads(member_bytes(s.path.with_suffix(".json")))
        original = by_name[meta["source"]]
        assert member_bytes(s.path) == original.path.read_bytes()
        assert sharded.classes[s.label] == folder.classes[original.label]


def test_shard_set_is_readable_by_the_webdataset_package(folder_and_shards):
    wds = pytest.importorskip("webdataset")
    _, shards, manifest = folder_and_shards
    url = str(shards / "train" / "train-{000000..000004}.tar")
    pairs = list(wds.WebDataset(url, shardshuffle=False).decode().to_tuple("cls", "json"))
    assert all(manifest["classes"][cls] == meta["label"] for cls, meta in pairs)
    assert Counter(meta["label"] for _, meta in pairs) == manifest["splits"]["train"]["counts"]


def test_training_streams_shards_with_the_folders_classes_and_counts(folder_and_shards, tmp_path):
    data, shards, _ = folder_and_shards
    opts = {**TINY, "strategy": "head-only", "epochs_frozen": 1}
    from_folder = transferlab.train(data, out=str(tmp_path / "folder"), **opts)
    from_shards = transferlab.train(shards, out=str(tmp_path / "shards-run"), **opts)
    assert from_shards.classes == from_folder.classes
    counts = [json.loads((r.run_dir / "data.json").read_text())["counts"] for r in (from_folder, from_shards)]
    assert counts[0] == counts[1]
    assert from_shards.summary["num_train"] == 18 and from_shards.summary["num_val"] == 3
    # evaluation reads shards too: the run's own val split, and a shard set passed as DATA
    assert transferlab.evaluate(from_shards.run_dir, plots=False, progress=False).metrics["n"] == 3
    assert transferlab.evaluate(from_shards.run_dir, shards, split="val", plots=False, progress=False).metrics["n"] == 3
    # a brace list of train shards works too (the val split is then held out of it)
    pattern = transferlab.train(str(shards / "train" / "train-{000000..000004}.tar"), out=str(tmp_path / "brace"),
                                **{**opts, "val_split": 0.2})
    assert pattern.summary["num_train"] + pattern.summary["num_val"] == 18


def test_expand_braces_follows_webdataset_shard_syntax():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..9}.tar") == ["a-8.tar", "a-9.tar", "b-8.tar", "b-9.tar"]


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_unlabelled_and_broken_members_are_skipped_with_a_reason(tmp_path):
    src = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=(3,), splits=("x",)) / "x"
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(sorted(src.rglob("*.png"))):
            add_member(tar, f"k{i}.png", path.read_bytes())
            if i:  # k0 has no label
                add_member(tar, f"k{i}.json", json.dumps({"label": path.parent.name}).encode())
        add_member(tar, "bad.jpg", b"oops")
        add_member(tar, "bad.cls", b"1")
    splits = load_splits(shard, progress=False)
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in splits.skipped}
    assert "label" in reasons["k0.png"] and "image" in reasons["bad.jpg"]
    assert len(splits.train) + len(splits.val) == 5


def test_unreadable_shard_is_a_clear_data_error(tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="Cannot read shard"):
        load_splits(bad, progress=False)
